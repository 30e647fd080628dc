#!/usr/bin/env python3
"""Uploads directories to an S3-compatible server with boto3 (independent of modelconv's
own client): ``s3_put.py ENDPOINT BUCKET PREFIX=DIR [PREFIX=DIR ...]``, the bucket made
first. Files keep their paths below DIR."""
import os
import sys

import boto3

endpoint, bucket, *specs = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
s3.create_bucket(Bucket=bucket)
for spec in specs:
    prefix, _, root = spec.partition("=")
    for dirpath, _, files in os.walk(root):
        for f in files:
            full = os.path.join(dirpath, f)
            key = prefix + os.path.relpath(full, root).replace(os.sep, "/")
            s3.upload_file(full, bucket, key)
