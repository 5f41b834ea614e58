"""Cloud metadata servers over real HTTP on 127.0.0.1, answering as GCE, AWS and Azure document.

Test keys sign the documents (GCE: RS256 JWT with a JWKS; AWS: PKCS#7 rsa2048 detached
signature by a self-signed certificate, as AWS publishes per region; Azure: PKCS#7 with content,
signed by a ``metadata.azure.com`` cert issued by a test CA). ``fault`` makes the next answers
misbehave: an HTTP status, ``"timeout"`` (no answer) or ``"garbage"``.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from vmagent.identity.tokens import b64url_encode, encode_jwt_parts

GOOGLE_ISSUER = "https://accounts.google.com"


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)


def make_cert(
    cn: str,
    key: Any,
    issuer: tuple[Any, x509.Certificate] | None = None,
    ca: bool = False,
    lifetime: float = 86400.0,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = time.time()
    signer_key, issuer_name = (issuer[0], issuer[1].subject) if issuer else (key, name)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - 60))
        .not_valid_after(_utc(now + lifetime))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer_key, hashes.SHA256())
    )


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class CloudKeys:
    """Signing keys standing in for Google's, AWS's and Azure's."""

    def __init__(self) -> None:
        self.gce_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.gce_kid = "test-kid-1"
        self.aws_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.aws_cert = make_cert("Amazon Web Services LLC (test)", self.aws_key)
        self.azure_ca_key = ec.generate_private_key(ec.SECP256R1())
        self.azure_ca = make_cert(
            "Microsoft Azure TLS Issuing CA (test)", self.azure_ca_key, ca=True
        )
        self.azure_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.azure_cert = make_cert(
            "metadata.azure.com", self.azure_key, (self.azure_ca_key, self.azure_ca)
        )

    def jwks(self) -> dict[str, Any]:
        numbers = self.gce_key.public_key().public_numbers()
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "alg": "RS256",
                    "use": "sig",
                    "kid": self.gce_kid,
                    "n": b64url_encode(numbers.n.to_bytes(256, "big")),
                    "e": b64url_encode(numbers.e.to_bytes(3, "big")),
                }
            ]
        }

    def write(self, folder: Path) -> dict[str, Path]:
        """JWKS and certificate files for the dev CA's settings."""
        files = {
            "jwks": folder / "google-jwks.json",
            "aws": folder / "aws-cert.pem",
            "azure": folder / "azure-ca.pem",
        }
        files["jwks"].write_text(json.dumps(self.jwks()))
        files["aws"].write_bytes(pem(self.aws_cert))
        files["azure"].write_bytes(pem(self.azure_ca))
        return files

    def gce_jwt(
        self, audience: str, *, lifetime: float = 3600.0, key: Any = None, **overrides: Any
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": GOOGLE_ISSUER,
            "aud": audience,
            "azp": "1234567890",
            "sub": "1234567890",
            "email": "vm@my-project.iam.gserviceaccount.com",
            "email_verified": True,
            "iat": now,
            "exp": int(now + lifetime),
            "google": {
                "compute_engine": {
                    "project_id": "my-project",
                    "project_number": 1234567890,
                    "zone": "europe-west1-b",
                    "instance_id": "4242",
                    "instance_name": "vm-1",
                    "instance_creation_timestamp": now - 1000,
                }
            },
        }
        claims.update(overrides)
        signing_input = encode_jwt_parts(
            {"alg": "RS256", "kid": self.gce_kid, "typ": "JWT"}, claims
        )
        signature = (key or self.gce_key).sign(
            signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{signing_input}.{b64url_encode(signature)}"

    def aws_document(self, instance_id: str = "i-0abc123") -> str:
        return json.dumps(
            {
                "accountId": "123456789012",
                "architecture": "x86_64",
                "availabilityZone": "eu-west-1a",
                "imageId": "ami-0123",
                "instanceId": instance_id,
                "instanceType": "t3.micro",
                "pendingTime": "2024-01-01T00:00:00Z",
                "privateIp": "10.0.0.5",
                "region": "eu-west-1",
                "version": "2017-09-30",
            },
            indent=2,
        )

    def aws_signature(self, document: str) -> str:
        """Base64 PKCS#7 (DER, detached, no certificates), as ``/rsa2048`` answers."""
        der = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(document.encode())
            .add_signer(self.aws_cert, self.aws_key, hashes.SHA256())
            .sign(
                serialization.Encoding.DER,
                [
                    pkcs7.PKCS7Options.DetachedSignature,
                    pkcs7.PKCS7Options.NoCerts,
                    pkcs7.PKCS7Options.Binary,
                ],
            )
        )
        text = base64.b64encode(der).decode()
        return "\n".join(text[i : i + 64] for i in range(0, len(text), 64))

    def azure_attested(
        self, nonce: str, vm_id: str, *, signer: Any = None, lifetime: float = 6 * 3600.0
    ) -> dict[str, str]:
        now = time.time()
        fmt = "%m/%d/%y %H:%M:%S -0000"
        data = json.dumps(
            {
                "licenseType": "",
                "nonce": nonce,
                "plan": {"name": "", "product": "", "publisher": ""},
                "sku": "22_04-lts-gen2",
                "subscriptionId": "sub-1111",
                "timeStamp": {
                    "createdOn": time.strftime(fmt, time.gmtime(now)),
                    "expiresOn": time.strftime(fmt, time.gmtime(now + lifetime)),
                },
                "vmId": vm_id,
            }
        )
        cert, key = signer or (self.azure_cert, self.azure_key)
        der = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(data.encode())
            .add_signer(cert, key, hashes.SHA256())
            .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
        )
        return {"encoding": "pkcs7", "signature": base64.b64encode(der).decode()}


Reply = tuple[int, dict[str, str], bytes]


class MetadataServer:
    """A threaded HTTP server on 127.0.0.1; subclasses implement :meth:`answer`."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.fault: int | str | None = None
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append((self.command, self.path, headers))
                if outer.fault == "timeout":
                    outer.release.wait(10)
                    return
                status, extra, body = outer.answer(self.command, self.path, headers)
                if outer.fault == "garbage":
                    status, body = 200, b"\x00\xffnot what you expected{"
                elif isinstance(outer.fault, int):
                    status, body = outer.fault, b"injected failure"
                self.send_response(status)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = _serve

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, method: str, path: str, headers: dict[str, str]) -> Reply:
        raise NotImplementedError

    def __enter__(self) -> MetadataServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _split(path: str) -> tuple[str, dict[str, str]]:
    parts = urllib.parse.urlsplit(path)
    return parts.path, dict(urllib.parse.parse_qsl(parts.query))


class GceEmulator(MetadataServer):
    """``/computeMetadata/v1``: requires ``Metadata-Flavor: Google`` (else 403)."""

    def __init__(self, keys: CloudKeys) -> None:
        super().__init__()
        self.keys = keys
        self.lifetime = 3600.0

    def answer(self, method: str, path: str, headers: dict[str, str]) -> Reply:
        flavor = {"Metadata-Flavor": "Google", "Content-Type": "application/text"}
        route, query = _split(path)
        if headers.get("metadata-flavor") != "Google":
            return 403, {"Content-Type": "text/html"}, b"Missing Metadata-Flavor:Google header."
        if method != "GET":
            return 405, flavor, b"Method not allowed"
        if route == "/computeMetadata/v1/":
            return 200, flavor, b"instance/\nproject/\n"
        if route == "/computeMetadata/v1/instance/service-accounts/default/identity":
            if not query.get("audience"):
                return 400, flavor, b"non-empty audience parameter required"
            token = self.keys.gce_jwt(query["audience"], lifetime=self.lifetime)
            return 200, flavor, token.encode()
        return 404, flavor, b"Not Found"


class AwsEmulator(MetadataServer):
    """IMDSv2: ``PUT /latest/api/token`` with a TTL header, then reads with the token; a read
    without a (valid) token gets 401, as on an instance with ``HttpTokens=required``."""

    def __init__(self, keys: CloudKeys) -> None:
        super().__init__()
        self.keys = keys
        self.tokens: set[str] = set()
        self.document = keys.aws_document()

    def answer(self, method: str, path: str, headers: dict[str, str]) -> Reply:
        text = {"Content-Type": "text/plain"}
        route, _ = _split(path)
        if route == "/latest/api/token":
            if method != "PUT":
                return 405, text, b""
            ttl = headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return 400, text, b""
            token = base64.b64encode(uuid.uuid4().bytes * 2).decode()
            self.tokens.add(token)
            return 200, {**text, "X-Aws-Ec2-Metadata-Token-Ttl-Seconds": ttl}, token.encode()
        if method != "GET":
            return 405, text, b""
        if headers.get("x-aws-ec2-metadata-token") not in self.tokens:
            return 401, text, b""
        if route == "/latest/dynamic/instance-identity/document":
            return 200, {"Content-Type": "application/json"}, self.document.encode()
        if route == "/latest/dynamic/instance-identity/rsa2048":
            return 200, text, self.keys.aws_signature(self.document).encode()
        return 404, text, b""


class AzureEmulator(MetadataServer):
    """IMDS: ``Metadata: true`` and ``api-version`` required (else 400)."""

    def __init__(self, keys: CloudKeys, vm_id: str = "02aab8a4-74ef-476e-8182-f6d2ba4166a6"):
        super().__init__()
        self.keys = keys
        self.vm_id = vm_id

    def answer(self, method: str, path: str, headers: dict[str, str]) -> Reply:
        js = {"Content-Type": "application/json; charset=utf-8"}
        route, query = _split(path)
        if headers.get("metadata", "").lower() != "true":
            return 400, js, b'{"error":"Bad request. Required metadata header not specified"}'
        if "api-version" not in query:
            return 400, js, b'{"error":"Bad request. api-version was not specified"}'
        if route == "/metadata/attested/document":
            body = self.keys.azure_attested(query.get("nonce", ""), self.vm_id)
            return 200, js, json.dumps(body).encode()
        if route == "/metadata/instance":
            compute = {
                "vmId": self.vm_id,
                "name": "vm-az-1",
                "resourceGroupName": "rg-1",
                "subscriptionId": "sub-1111",
                "location": "westeurope",
                "vmScaleSetName": "",
                "osType": "Linux",
            }
            return 200, js, json.dumps({"compute": compute, "network": {}}).encode()
        return 404, js, b'{"error":"Not found"}'
