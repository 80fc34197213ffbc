#!/usr/bin/env bash
# Screenshots for the docs (`make screenshots`): the denial page a browser gets,
# and mitmweb's flow list with each decision in its Comment column. Needs
# Debian's chromium (apt-get install chromium).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=docs/images
gw=127.0.0.1:18280 web=127.0.0.1:18281 backend=127.0.0.1:19280
.venv/bin/python - "$backend" <<'PY' &
import sys, time
from authgate.tools.demo import start_backend
host, _, port = sys.argv[1].rpartition(":")
start_backend(host, int(port))
time.sleep(60)
PY
backend_pid=$!
.venv/bin/authgate run --policy policies/example.yaml --upstream "http://$backend" \
    --listen "$gw" --web --web-listen "$web" >/dev/null 2>&1 &
gw_pid=$!
trap 'kill $gw_pid $backend_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -s -o /dev/null "http://$gw/health" && break; sleep 0.2; done
token=$(.venv/bin/authgate token --sub alice --role user)
curl -s -o /dev/null "http://$gw/health"
curl -s -o /dev/null "http://$gw/api/profile"
curl -s -o /dev/null -H "Authorization: Bearer $token" "http://$gw/api/profile"
curl -s -o /dev/null -H "Authorization: Bearer $token" "http://$gw/api/admin/users"
curl -s -o /dev/null "http://$gw/api/secrets/x"
chrome=(chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run
        --disable-background-networking --disable-component-update --disable-sync
        --user-data-dir="$(mktemp -d)" --hide-scrollbars)
"${chrome[@]}" --window-size=900,600 --screenshot="$out/denial-page.png" \
    "http://$gw/api/admin/users" 2>/dev/null
"${chrome[@]}" --window-size=1280,800 --virtual-time-budget=5000 \
    --screenshot="$out/mitmweb-flows.png" "http://$web/" 2>/dev/null
echo "wrote $out/denial-page.png and $out/mitmweb-flows.png"
