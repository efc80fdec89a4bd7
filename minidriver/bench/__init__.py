"""Benchmarks and the load test: where spawn's time goes, against the floor and a peer.

Tooling for developers and CI, not part of the driver; uses only the driver's public API.
``python -m minidriver.bench`` is ``scripts/bench`` (``spawn``), ``python -m
minidriver.bench.rbd`` is ``scripts/bench-rbd``, ``python -m minidriver.bench.loadtest``
is ``scripts/load-test``. The modules: ``stats`` (min / median / max, per-pair ratios,
alternation), ``sections`` (each scenario's part of the JSON document), ``report``
(tables and targets), ``harness`` (errors, signals, the log, the document),
``synthetic`` (the 300 MiB-data image), ``peer`` (virt-install), ``spawn`` (the spawn
scenarios and the command), ``rbd``, ``loadtest``.
"""
