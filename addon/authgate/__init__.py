"""authgate: an auth gateway that runs as a mitmproxy addon."""

import logging

# passlib (imported by mitmproxy 11's proxyauth addon) logs a traceback when it
# meets bcrypt >= 4.1, which authgate uses for Basic auth. It is harmless
# (passlib copes) and not ours to fix; keep it out of the gateway's log.
logging.getLogger("passlib").setLevel(logging.ERROR)
