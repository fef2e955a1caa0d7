"""Prepares a moto_server for the STS tests (run with IAM enforcement still off).

Creates the bucket, an IAM user for the proxy that may only assume the upload role (and
HeadBucket/ListBucket for readiness), the upload role whose own policy allows only `uploads/*`,
and an admin user for the test's own checks. Prints their keys as JSON.
Usage: python moto_iam_setup.py ENDPOINT BUCKET
"""

import json
import sys
from pathlib import Path

import boto3

endpoint, bucket = sys.argv[1], sys.argv[2]
kw = dict(
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="testing",
    aws_secret_access_key="testing",
)
iam = boto3.client("iam", **kw)
s3 = boto3.client("s3", **kw)
s3.create_bucket(Bucket=bucket)
# The shipped bucket CORS rules must be what S3 accepts (botocore validates the shape).
cors = Path(__file__).resolve().parent.parent / "deploy" / "s3-cors.json"
s3.put_bucket_cors(Bucket=bucket, CORSConfiguration=json.loads(cors.read_text()))
assert s3.get_bucket_cors(Bucket=bucket)["CORSRules"][0]["ExposeHeaders"][0] == "ETag"


def policy(*statements):
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


proxy = iam.create_user(UserName="proxy")["User"]
# moto checks the trust policy against the caller's exact ARN.
role = iam.create_role(
    RoleName="upload-role",
    AssumeRolePolicyDocument=policy(
        {
            "Effect": "Allow",
            "Principal": {"AWS": proxy["Arn"]},
            "Action": ["sts:AssumeRole", "sts:SetSourceIdentity"],
        }
    ),
)["Role"]
iam.put_role_policy(
    RoleName="upload-role",
    PolicyName="uploads-only",
    PolicyDocument=policy(
        {
            "Effect": "Allow",
            "Action": [
                "s3:PutObject",
                "s3:GetObject",
                "s3:DeleteObject",
                "s3:AbortMultipartUpload",
                "s3:ListMultipartUploadParts",
            ],
            "Resource": f"arn:aws:s3:::{bucket}/uploads/*",
        },
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"},
    ),
)
iam.put_user_policy(
    UserName="proxy",
    PolicyName="assume-upload-role",
    PolicyDocument=policy(
        {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": role["Arn"]},
        {
            "Effect": "Allow",
            "Action": ["s3:HeadBucket", "s3:ListBucket"],
            "Resource": f"arn:aws:s3:::{bucket}",
        },
    ),
)
proxy_key = iam.create_access_key(UserName="proxy")["AccessKey"]

iam.create_user(UserName="admin")
iam.put_user_policy(
    UserName="admin",
    PolicyName="everything",
    PolicyDocument=policy({"Effect": "Allow", "Action": "*", "Resource": "*"}),
)
admin_key = iam.create_access_key(UserName="admin")["AccessKey"]

print(
    json.dumps(
        {
            "proxy_access_key": proxy_key["AccessKeyId"],
            "proxy_secret_key": proxy_key["SecretAccessKey"],
            "admin_access_key": admin_key["AccessKeyId"],
            "admin_secret_key": admin_key["SecretAccessKey"],
            "role_arn": role["Arn"],
        }
    )
)
