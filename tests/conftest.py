import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from training.families import FAMILIES  # noqa: E402

# One thread: tiny models gain nothing from more, and OpenMP threads waiting on each other under load made
# steps 5-28x slower on these 2-core machines.
torch.set_num_threads(1)

FAMILY_NAMES = list(FAMILIES)


@pytest.fixture(scope="session")
def tiny_models():
    """Family name -> (model, processor), built once per session; tests must not mutate the weights."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = FAMILIES[name].build_tiny(seed=0)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Family name -> a folder with a saved tiny random checkpoint (model + processor)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = FAMILIES[name].save_tiny(tmp_path_factory.mktemp(f"tiny-{name}"), seed=0)
        return cache[name]
    return get
