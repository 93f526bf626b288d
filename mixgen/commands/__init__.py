"""The commands besides a run: ``verify`` (and ``--recompute``), ``preview``, ``cam`` and ``stats``.
Each reads a run's OUT through ``mixgen.output`` and the stages; the CLI only parses and prints."""
