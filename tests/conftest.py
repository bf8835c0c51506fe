"""Parametrizes the op-contract checks of `tests/contract.py` from each test class's `spec`."""

from contract import case_matrix


def pytest_generate_tests(metafunc):
    spec = getattr(metafunc.cls, "spec", None)
    if spec is None:
        return
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", spec.impls)
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", case_matrix(spec.chunk_size))
