"""Quantization tests: one torch thread.

The algorithms (GPTQ's column loop, the clipping search) run thousands of tiny tensor ops on the
test models' small layers; with intra-op threads each op pays a thread-pool hand-off (measured:
the search test took 33 s with 2 threads on a busy machine, 8 s with one).
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
