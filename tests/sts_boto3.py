"""A direct-mode client in boto3: fetches /sts from the proxy, then uploads straight to S3.

Uploads a 2-part multipart object under the returned prefix, then tries to write outside
`uploads/` (which the upload role refuses). Prints JSON: key, sha256 of what was sent, and the
error code of the refused write.
Usage: python sts_boto3.py PROXY_URL TOKEN S3_ENDPOINT
"""

import hashlib
import json
import os
import sys
import urllib.request

import boto3
from botocore.exceptions import ClientError

proxy, token, endpoint = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(f"{proxy}/sts", headers={"Authorization": f"Bearer {token}"})
with urllib.request.urlopen(req) as resp:
    sts = json.load(resp)
creds = sts["credentials"]
s3 = boto3.client(
    "s3",
    endpoint_url=endpoint,
    region_name=sts["region"],
    aws_access_key_id=creds["AccessKeyId"],
    aws_secret_access_key=creds["SecretAccessKey"],
    aws_session_token=creds["SessionToken"],
)
bucket, key = sts["bucket"], sts["prefix"] + "boto3.bin"
parts = [os.urandom(5 * 1024 * 1024), os.urandom(1234)]
upload = s3.create_multipart_upload(Bucket=bucket, Key=key)
done = []
for number, body in enumerate(parts, start=1):
    out = s3.upload_part(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number, Body=body
    )
    done.append({"PartNumber": number, "ETag": out["ETag"]})
s3.complete_multipart_upload(
    Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
)
try:
    s3.put_object(Bucket=bucket, Key="elsewhere/boto3.bin", Body=b"x")
    refused = None
except ClientError as e:
    refused = e.response["Error"]["Code"]
print(
    json.dumps(
        {
            "key": key,
            "sha256": hashlib.sha256(b"".join(parts)).hexdigest(),
            "outside": refused,
        }
    )
)
