"""Volumes: the block storage service (Cinder's role: cinder/volume/).

``api`` holds the records and their states (cinder/volume/api.py); the backends make
and remove the storage behind them: ``rbd`` (cinder/volume/drivers/rbd.py) and
``pool``, libvirt's storage pools. An instance uses a volume through
``minidriver.block_device``.
"""
