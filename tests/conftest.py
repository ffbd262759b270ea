import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

try:  # one torch thread on CPU: two threads run the tests much slower on these machines
    import torch

    torch.set_num_threads(1)
except ImportError:  # torch is optional for the core tests
    pass
