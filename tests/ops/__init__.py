"""The SLIM op's tests: one conformance suite that holds every backend to the fp64 reference
(``_harness.py``, ``test_conformance.py``, ``test_layouts.py``), the op boundary, dispatch,
and what is specific to one backend (``test_<backend>_specific.py``)."""
