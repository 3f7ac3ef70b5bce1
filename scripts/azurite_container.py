"""Creates a blob container in Azurite (Azure's storage emulator) with a SharedKey-signed
request, using the emulator's published development account. Standard library only.

  azurite_container.py http://127.0.0.1:10000 CONTAINER
"""
import base64
import hashlib
import hmac
import sys
import urllib.error
import urllib.request
from email.utils import formatdate

ACCOUNT = "devstoreaccount1"
# The well-known development key every Azurite installation uses.
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

endpoint, container = sys.argv[1], sys.argv[2]
date = formatdate(usegmt=True)
version = "2021-08-06"
string_to_sign = "\n".join([
    "PUT", "", "", "", "", "", "", "", "", "", "", "",
    f"x-ms-date:{date}\nx-ms-version:{version}",
    f"/{ACCOUNT}/{ACCOUNT}/{container}\nrestype:container",
])
signature = base64.b64encode(
    hmac.new(base64.b64decode(KEY), string_to_sign.encode(), hashlib.sha256).digest()
).decode()
request = urllib.request.Request(
    f"{endpoint}/{ACCOUNT}/{container}?restype=container",
    method="PUT",
    headers={
        "x-ms-date": date,
        "x-ms-version": version,
        "Authorization": f"SharedKey {ACCOUNT}:{signature}",
        "Content-Length": "0",
    },
)
try:
    urllib.request.urlopen(request, timeout=10)
except urllib.error.HTTPError as e:
    if e.code != 409:  # 409: the container exists already
        sys.exit(f"creating container {container}: HTTP {e.code}: {e.read().decode()}")
