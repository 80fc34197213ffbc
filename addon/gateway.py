"""mitmproxy entry script for authgate.

    mitmdump -s addon/gateway.py --mode reverse:http://127.0.0.1:9000 \
        --set authgate_policy=policies/example.yaml --set connection_strategy=lazy

Prefer `authgate run` in production: mitmproxy hot-reloads `-s` scripts, and
a script that fails to reload is unloaded, which lets traffic through.
"""

import os
import sys

# Works from a clone without installing: the package sits beside this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from authgate.proxy import guard  # noqa: E402
from authgate.proxy.addon import Gateway  # noqa: E402

addons = [Gateway(), *guard.addons()]
