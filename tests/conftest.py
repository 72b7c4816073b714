import pytest

from lens_laai.testing import tiny_model, tiny_task


@pytest.fixture(scope="session")
def tiny():
    return tiny_model()


@pytest.fixture(scope="session")
def task():
    return tiny_task()
