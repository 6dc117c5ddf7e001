"""moto's server, plus a shim for the VM Import calls moto lacks: for tests/distribute_aws.rs.

moto (a Python implementation of the AWS APIs that no one here wrote) answers S3, IAM and
EC2's image calls: RegisterImage, DescribeImages, CreateTags, CopyImage, ModifyImageAttribute,
GetRole, and every S3 call. It does not implement VM Import. This runs moto's own WSGI app (as
its `moto_server` does) behind a WSGI middleware that answers only ImportSnapshot,
DescribeImportSnapshotTasks, ImportImage, DescribeImportImageTasks and CancelImportTask, and
passes every other request to moto untouched. The shim works on moto's state, as VM Import
works on AWS's: ImportSnapshot reads the disk from moto's S3 (it must exist and be a VMDK),
and a completed task's snapshot (and ImportImage's image) is created in moto's EC2, so
RegisterImage and DescribeImages see them. (moto's RegisterImage keeps only the name and the
description and makes the image's root snapshot itself: the parameters builder sends are
checked on the recorded calls, GET /vmimport-shim/calls.) The shim checks each of its requests' SigV4
signature with moto's own check (botocore's signer).

moto checks every signature from the start of the tests on (its IAM authentication, with the
access key of an IAM user allowed everything): the setup below runs before it is turned on.

    python moto_vmimport.py --port PORT [--bucket NAME] [--no-role] [--image-named NAME]

prints one JSON line when ready: {"access_key": …, "secret_key": …}. Test-only endpoints
(no signature): GET /vmimport-shim/calls (every EC2/IAM Query call: action, region, dry run,
parameters, session token, the HTTP status of the answer, the import task it started), POST /vmimport-shim/script with JSON {"active_polls": N,
"fail_with": "message"} (how the next import tasks progress and end).
"""

import argparse
import io
import json
import sys
import threading
import urllib.parse

import boto3
from moto import settings
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends
from moto.iam.access_control import IAMRequest
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from moto.s3.models import s3_backends
from werkzeug.serving import make_server

SHIMMED = {
    "ImportSnapshot",
    "DescribeImportSnapshotTasks",
    "ImportImage",
    "DescribeImportImageTasks",
    "CancelImportTask",
}
GIB = 1 << 30


class Shim:
    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.calls = []
        self.script = {"active_polls": 1, "fail_with": None}
        self.tasks = {}  # task id -> dict
        self.next_task = 1

    # --- WSGI -------------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/vmimport-shim/calls":
            with self.lock:
                return self.reply(start_response, 200, json.dumps(self.calls), "application/json")
        if path == "/vmimport-shim/script":
            body = self.read_body(environ)
            with self.lock:
                self.script.update(json.loads(body or b"{}"))
            return self.reply(start_response, 200, "{}", "application/json")

        form = None
        ctype = environ.get("CONTENT_TYPE", "")
        if (
            environ.get("REQUEST_METHOD") == "POST"
            and path == "/"
            and ctype.startswith("application/x-www-form-urlencoded")
        ):
            body = self.read_body(environ)
            form = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        if form is None or "Action" not in form:
            return self.app(environ, start_response)

        auth = environ.get("HTTP_AUTHORIZATION", "")
        scope = auth.partition("Credential=")[2].partition(",")[0].split("/")
        region = scope[2] if len(scope) > 2 else ""
        action = form["Action"]
        params = {k: v for k, v in form.items() if k not in ("Action", "Version")}
        call = {
            "action": action,
            "service": scope[3] if len(scope) > 3 else "",
            "region": region,
            "dry_run": params.get("DryRun") == "true",
            "params": params,
            "session_token": environ.get("HTTP_X_AMZ_SECURITY_TOKEN"),
        }
        if action not in SHIMMED:
            # Recorded with moto's answer's status (401 for a signature moto refused).
            def record(status, headers, exc_info=None):
                call["status"] = int(status.split()[0])
                with self.lock:
                    self.calls.append(call)
                return start_response(status, headers, exc_info)

            return self.app(environ, record)

        try:
            self.check_signature(environ, body, form, action)
        except Exception as e:  # moto's AuthFailure (a werkzeug HTTPException): answer it
            if hasattr(e, "get_response"):
                return e(environ, start_response)
            raise
        with self.lock:
            call["status"] = 412 if call["dry_run"] else 200
            self.calls.append(call)
            if call["dry_run"]:
                return self.ec2_error(
                    start_response,
                    412,
                    "DryRunOperation",
                    "Request would have succeeded, but DryRun flag is set.",
                )
            try:
                status, inner = getattr(self, action)(region, params)
            except ShimError as e:
                call["status"] = 400
                return self.ec2_error(start_response, 400, e.code, e.message)
        if status != 200:
            return self.ec2_error(start_response, status, inner[0], inner[1])
        return self.reply(
            start_response,
            200,
            f'<?xml version="1.0" encoding="UTF-8"?>\n<{action}Response '
            f'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>vmimport-shim'
            f"</requestId>{inner}</{action}Response>",
        )

    @staticmethod
    def read_body(environ):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        return body

    @staticmethod
    def reply(start_response, status, body, ctype="text/xml;charset=UTF-8"):
        data = body.encode()
        reason = {200: "OK", 400: "Bad Request", 412: "Precondition Failed"}.get(status, "Error")
        start_response(
            f"{status} {reason}", [("Content-Type", ctype), ("Content-Length", str(len(data)))]
        )
        return [data]

    def ec2_error(self, start_response, status, code, message):
        return self.reply(
            start_response,
            status,
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
            f"<Code>{code}</Code><Message>{escape(message)}</Message></Error></Errors>"
            "<RequestID>vmimport-shim</RequestID></Response>",
        )

    @staticmethod
    def check_signature(environ, body, form, action):
        headers = {
            key[5:].replace("_", "-").title(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        headers["Content-Type"] = environ.get("CONTENT_TYPE", "")
        headers["Content-Length"] = environ.get("CONTENT_LENGTH", "")
        # moto's header lookups are case-sensitive: its own names.
        if "Authorization" not in headers:
            headers["Authorization"] = ""
        if "X-Amz-Date" not in headers and "X-Amz-Date".upper() in headers:
            headers["X-Amz-Date"] = headers["X-Amz-Date".upper()]
        IAMRequest(
            account_id=DEFAULT_ACCOUNT_ID,
            method="POST",
            path="/",
            data=form,
            body=body,
            headers=headers,
            action=action,
        ).check_signature()

    # --- VM Import, on moto's S3 and EC2 ------------------------------------------------------

    def ec2(self, region):
        return ec2_backends[DEFAULT_ACCOUNT_ID][region]

    def new_task(self, kind, region, **fields):
        task_id = f"import-{kind}-{self.next_task:017x}"
        self.next_task += 1
        self.calls[-1]["task"] = task_id  # the call being answered (the lock is held)
        self.tasks[task_id] = dict(
            id=task_id,
            kind=kind,
            region=region,
            polls=0,
            state="active",
            active_polls=self.script["active_polls"],
            fail_with=self.script["fail_with"],
            **fields,
        )
        return task_id

    def vmdk_size_gib(self, bucket, key):
        """The disk's virtual size in GiB (at least 1), read from the VMDK in moto's S3."""
        obj = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_object(bucket, key)
        if obj is None:
            raise ShimError(
                "InvalidParameter", f"the S3 object s3://{bucket}/{key} does not exist"
            )
        head = obj.value[:20]
        if head[:4] != b"KDMV":
            raise ShimError(
                "InvalidParameter",
                f"ClientError: Disk validation failed [s3://{bucket}/{key} is not a VMDK]",
            )
        sectors = int.from_bytes(head[12:20], "little")
        return max(1, -(-sectors * 512 // GIB))

    def make_snapshot(self, task):
        volume = self.ec2(task["region"]).create_volume(
            size=task["size_gib"], zone_name=f"{task['region']}a"
        )
        snapshot = self.ec2(task["region"]).create_snapshot(
            volume.id, f"Created by AWS-VMImport service for {task['id']}"
        )
        return snapshot.id

    def advance(self, task):
        """One poll: `active` for the scripted number of polls, then `completed` (or
        `deleted` with the scripted failure)."""
        task["polls"] += 1
        if task["state"] != "active":
            return
        if task["polls"] <= task["active_polls"]:
            return
        if task["fail_with"]:
            task["state"] = "deleted"
            task["message"] = task["fail_with"]
            return
        if task["kind"] == "ami":
            # moto's own RegisterImage makes the image's root snapshot itself.
            image = self.ec2(task["region"]).register_image(
                f"import-ami-{task['id']}", f"AWS-VMImport service: {task['id']}"
            )
            task["image_id"] = image.id
            task["snapshot_id"] = image.ebs_snapshot.id
        else:
            task["snapshot_id"] = self.make_snapshot(task)
        task["state"] = "completed"

    def progress(self, task):
        if task["state"] != "active":
            return ""
        pct = 30 if task["polls"] <= 1 else 70
        return f"<progress>{pct}</progress><statusMessage>converting</statusMessage>"

    def disk(self, params, prefix):
        bucket = params.get(f"{prefix}.UserBucket.S3Bucket")
        key = params.get(f"{prefix}.UserBucket.S3Key")
        if not bucket or not key:
            raise ShimError("MissingParameter", f"{prefix}.UserBucket is required")
        fmt = params.get(f"{prefix}.Format", "")
        if fmt.upper() != "VMDK":
            raise ShimError("InvalidParameter", f"unsupported disk format `{fmt}`")
        return bucket, key, self.vmdk_size_gib(bucket, key)

    def ImportSnapshot(self, region, params):
        bucket, key, size = self.disk(params, "DiskContainer")
        task_id = self.new_task("snap", region, bucket=bucket, key=key, size_gib=size)
        return 200, (
            f"<importTaskId>{task_id}</importTaskId><snapshotTaskDetail>"
            "<status>active</status><progress>0</progress></snapshotTaskDetail>"
        )

    def ImportImage(self, region, params):
        bucket, key, size = self.disk(params, "DiskContainer.1")
        task_id = self.new_task("ami", region, bucket=bucket, key=key, size_gib=size)
        return 200, f"<importTaskId>{task_id}</importTaskId><status>active</status>"

    def task_for(self, params, kind):
        task_id = params.get("ImportTaskId.1", "")
        task = self.tasks.get(task_id)
        if task is None or task["kind"] != kind:
            raise ShimError(
                "InvalidConversionTaskId.Malformed", f"The import task {task_id} does not exist"
            )
        self.advance(task)
        return task_id, task

    def DescribeImportSnapshotTasks(self, _region, params):
        task_id, task = self.task_for(params, "snap")
        detail = f"<status>{task['state']}</status>" + self.progress(task)
        if task["state"] == "completed":
            detail += (
                f"<snapshotId>{task['snapshot_id']}</snapshotId>"
                f"<diskImageSize>{task['size_gib'] * GIB}</diskImageSize><format>VMDK</format>"
            )
        elif task["state"] == "deleted":
            detail += f"<statusMessage>{escape(task['message'])}</statusMessage>"
        return 200, (
            f"<importSnapshotTaskSet><item><importTaskId>{task_id}</importTaskId>"
            f"<snapshotTaskDetail>{detail}</snapshotTaskDetail></item></importSnapshotTaskSet>"
        )

    def DescribeImportImageTasks(self, _region, params):
        task_id, task = self.task_for(params, "ami")
        body = f"<status>{task['state']}</status>" + self.progress(task)
        if task["state"] == "completed":
            body += (
                f"<imageId>{task['image_id']}</imageId><snapshotDetailSet><item>"
                f"<snapshotId>{task['snapshot_id']}</snapshotId></item></snapshotDetailSet>"
            )
        elif task["state"] == "deleted":
            body += f"<statusMessage>{escape(task['message'])}</statusMessage>"
        return 200, (
            f"<importImageTaskSet><item><importTaskId>{task_id}</importTaskId>{body}"
            "</item></importImageTaskSet>"
        )

    def CancelImportTask(self, _region, params):
        task_id = params.get("ImportTaskId", "")
        task = self.tasks.get(task_id)
        if task is None:
            raise ShimError(
                "InvalidConversionTaskId.Malformed", f"The import task {task_id} does not exist"
            )
        previous = task["state"]
        task["state"] = "deleting"
        task["message"] = "cancelled by the user"
        return 200, (
            f"<importTaskId>{task_id}</importTaskId><previousState>{previous}</previousState>"
            "<state>deleting</state>"
        )


class ShimError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--bucket", action="append", default=[])
    ap.add_argument("--no-role", action="store_true")
    ap.add_argument("--image-named", action="append", default=[])
    args = ap.parse_args()

    app = Shim(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", args.port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    # Setup, before moto checks signatures: an IAM user allowed everything (its key signs
    # the tests' requests), the VM Import role, the buckets, images that already exist.
    endpoint = f"http://127.0.0.1:{args.port}"
    setup = dict(
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="builder-tests")
    key = iam.create_access_key(UserName="builder-tests")["AccessKey"]
    iam.put_user_policy(
        UserName="builder-tests",
        PolicyName="everything",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }
        ),
    )
    if not args.no_role:
        iam.create_role(
            RoleName="vmimport",
            AssumeRolePolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "vmie.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
            ),
        )
    s3 = boto3.client("s3", **setup)
    for bucket in args.bucket:
        s3.create_bucket(Bucket=bucket)
    ec2 = boto3.client("ec2", **setup)
    for name in args.image_named:
        volume = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")
        snapshot = ec2.create_snapshot(VolumeId=volume["VolumeId"])
        ec2.register_image(
            Name=name,
            RootDeviceName="/dev/xvda",
            BlockDeviceMappings=[
                {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot["SnapshotId"]}}
            ],
        )
    with app.lock:
        app.calls.clear()
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0

    print(
        json.dumps({"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}),
        flush=True,
    )
    # Serve until the test kills this process (or closes its stdin).
    sys.stdin.read()


if __name__ == "__main__":
    main()
