"""Docker HEALTHCHECK of the API: exits 0 when GET /health answers 200 on this container's port."""

import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('QTTS_PORT', '8000')}/health"
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # any failure is "unhealthy"; the message lands in `docker inspect`
    print(f"{url}: {exc}", file=sys.stderr)
    sys.exit(1)
