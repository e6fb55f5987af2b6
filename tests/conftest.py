import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# Tiny test models run fastest single-threaded; it also keeps parallel Ray actors from
# oversubscribing the two cores.
torch.set_num_threads(int(os.environ.get("SPECSERVE_TEST_THREADS", "1")))
