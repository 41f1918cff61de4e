"""The apparatus around the method, imported by nothing in the package: the tiny checkpoint
and the synthetic tasks the demo and tests run on (``tiny``, ``archs``, ``synth``,
``beacon``, ``base``), experiments (``repro``), measurements (``bench``, ``plan``), the demo's
printout (``demo``) and command-line helpers (``sft``, ``merge``). Each runs as
``python -m mgpo.tools.<name>``."""
