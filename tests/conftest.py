import pyro
import pytest
import torch

import pyroflows


@pytest.fixture(autouse=True)
def _fresh_state():
    """Validation on, a clean param store and a fixed seed for every test."""
    torch_validate = torch.distributions.Distribution._validate_args
    pyroflows.enable_validation(True)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    yield
    pyroflows.enable_validation(None)
    torch.distributions.Distribution.set_default_validate_args(torch_validate)  # e.g. torch.compile clears it
