"""Drives the proxy's tus endpoint with tuspy. Called by tests/tus_clients.rs.

Usage: tus_upload.py ENDPOINT TOKEN FILE CHUNK_SIZE [UPLOAD_URL|-] [STOP_AT]
CHUNK_SIZE 0 sends the whole file in one PATCH. UPLOAD_URL resumes that upload; STOP_AT ends
the process early (the upload stays unfinished for another process to resume). Every PATCH
carries an Upload-Checksum (sha1). Prints JSON lines: {"event": "url" | "success", ...}.
"""
import json
import os
import sys

from tusclient import client


def main():
    endpoint, token, path, chunk = sys.argv[1:5]
    url = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "-" else None
    stop_at = int(sys.argv[6]) if len(sys.argv) > 6 else None
    tus = client.TusClient(endpoint, headers={"Authorization": f"Bearer {token}"})
    kwargs = {
        "metadata": {"filename": os.path.basename(path)},
        "retries": 3,
        "retry_delay": 0.2,
        "upload_checksum": True,
    }
    if int(chunk) > 0:
        kwargs["chunk_size"] = int(chunk)
    if url:
        kwargs["url"] = url
    uploader = tus.uploader(path, **kwargs)
    if not uploader.url:
        uploader.set_url(uploader.create_url())
    print(json.dumps({"event": "url", "url": uploader.url, "offset": uploader.offset}), flush=True)
    uploader.upload(stop_at=stop_at)
    event = "stopped" if stop_at else "success"
    print(json.dumps({"event": event, "url": uploader.url, "offset": uploader.offset}), flush=True)


if __name__ == "__main__":
    main()
