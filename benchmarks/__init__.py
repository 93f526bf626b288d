"""mixgen's benchmarks: throughput (``bench``), label fidelity (``fidelity``, ``cam_variants``,
``real_variants``), training (``train_eval``), scale and probe timing. Run each from the repository
root as ``python -m benchmarks.NAME``; shared helpers live in ``benchmarks.common``."""
