"""minidriver: a libvirt compute driver prototype modelled on Nova's libvirt driver."""

__version__ = "0.1.0"
