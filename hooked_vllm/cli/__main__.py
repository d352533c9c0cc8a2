"""``python -m hooked_vllm.cli ...`` (as torchrun runs it): the same as ``hooked-vllm ...``."""

import sys

from hooked_vllm.cli import main

sys.exit(main())
