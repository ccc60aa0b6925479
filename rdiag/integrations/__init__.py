"""Adapters that attach a :class:`rdiag.Monitor` to other trainers.

* :mod:`rdiag.integrations.lightning`: ``RdiagMonitor``, a Lightning ``Callback``
  (``pip install 'rdiag[lightning]'``);
* :mod:`rdiag.integrations.hf`: ``RdiagCallback``, a Hugging Face
  ``TrainerCallback`` (``pip install 'rdiag[hf]'``).

Each imports its framework when it is imported itself; this package imports
neither.
"""
