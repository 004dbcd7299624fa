#!/usr/bin/env python3
"""A test double of the Personal Demographics Service FHIR R4 API and of the
NHS API platform's OAuth 2.0 token endpoint (application-restricted access,
signed JWT pattern), written from the published specification
(NHSDigital/personal-demographics-service-api: specification/, sandbox/mocks)
and the platform's signed-JWT guide, not from the gateway's code.

  POST /oauth2/token
      form: grant_type=client_credentials,
            client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer,
            client_assertion=<JWT signed RS512, header kid; claims iss = sub =
            the API key, aud = this URL, jti unused before, exp at most
            5 minutes ahead>
      200 {"access_token", "expires_in": "599", "token_type": "Bearer", "issued_at"}
      400/401 {"error", "error_description"}
  GET /personal-demographics/FHIR/R4/Patient/{id}
      Authorization: Bearer <token>, X-Request-ID: <UUID> (mirrored back)
      200 Patient (application/fhir+json), 404/400/401/429 OperationOutcome

Started on 127.0.0.1 on a free port; prints one JSON line
{"port": N, "private_key": PATH} when ready. It makes a fresh RSA key pair
and writes the private half (PEM) for the client under test; it verifies
assertions with the public half.

Synthetic patients only: NHS numbers in the 999 range with valid Modulus 11
check digits (see PATIENTS). Behaviour can be changed while running through
POST /_control (JSON), and read back with GET /_control.
"""

import argparse
import json
import secrets
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

FHIR_BASE = "/personal-demographics/FHIR/R4"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ODS_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"
UUID_CHARS = set("0123456789abcdefABCDEF-")


def nhs_number(stem):
    """Stem (9 digits) + its Modulus 11 check digit, or None when 10."""
    total = sum(int(d) * w for d, w in zip(stem, range(10, 1, -1)))
    check = 11 - total % 11
    if check == 11:
        check = 0
    if check == 10:
        return None
    return stem + str(check)


def valid_nhs_number(s):
    return len(s) == 10 and s.isdigit() and len(set(s)) > 1 and nhs_number(s[:9]) == s


def first_valid(start):
    n = start
    while True:
        v = nhs_number(str(n))
        if v:
            return v
        n += 1


# Scenario patients: keys are the NHS numbers asked for.
REGISTERED = first_valid(999100001)       # registered at YG002 (on the network in tests)
NOT_CONNECTED = first_valid(999100101)    # registered at Y12345 (not on the network)
NO_PRACTICE = first_valid(999100201)      # no generalPractitioner
OLD_NUMBER = first_valid(999100301)       # superseded: answered with NEW_NUMBER
NEW_NUMBER = first_valid(999100401)
DECEASED = first_valid(999100501)
RESTRICTED = first_valid(999100601)       # meta.security R: GP removed by PDS
INVALIDATED = first_valid(999100701)      # 404 INVALIDATED_RESOURCE
SLOW = first_valid(999100801)             # answers after 5 s
THROTTLED = first_valid(999100901)        # always 429
UNREADABLE = first_valid(999101001)       # 200 with a body that is not a Patient (a fault)
REFUSED_ID = first_valid(999101101)       # 400 INVALID_RESOURCE_ID: PDS refuses the number itself


def patient(nhs, birth_date="1985-06-15", practice=None, deceased=None, security="U"):
    display = {"U": "unrestricted", "R": "restricted", "V": "very restricted"}[security]
    p = {
        "resourceType": "Patient",
        "id": nhs,
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs}],
        "meta": {"versionId": "1", "security": [
            {"system": CONFIDENTIALITY, "code": security, "display": display}]},
        "name": [{"use": "usual", "family": "Example", "given": ["Sam"]}],
        "gender": "unknown",
        "birthDate": birth_date,
    }
    if deceased:
        p["deceasedDateTime"] = deceased
    if practice:
        p["generalPractitioner"] = [{
            "id": "254406A3", "type": "Organization",
            "identifier": {"system": ODS_SYSTEM, "value": practice,
                           "period": {"start": "2020-01-01"}}}]
    return p


def default_patients():
    return {
        REGISTERED: patient(REGISTERED, practice="YG002"),
        NOT_CONNECTED: patient(NOT_CONNECTED, practice="Y12345"),
        NO_PRACTICE: patient(NO_PRACTICE),
        OLD_NUMBER: patient(NEW_NUMBER, practice="YG002"),
        DECEASED: patient(DECEASED, practice="YG002", deceased="2026-01-02T00:00:00+00:00"),
        # PDS removes address, telecom and generalPractitioner from a restricted record.
        RESTRICTED: patient(RESTRICTED, security="R"),
        SLOW: patient(SLOW, practice="YG002"),
    }


class State:
    def __init__(self, api_key, kid, public_key):
        self.lock = threading.Lock()
        self.api_key = api_key
        self.kid = kid
        self.public_key = public_key
        self.patients = default_patients()
        self.tokens = {}          # token -> expiry (epoch s)
        self.jtis = set()
        self.down = False         # every call answers 503
        self.delay_ms = 0         # every call waits this long first
        self.throttle = 0         # the next N calls answer 429
        self.flaky = {}           # NHS number -> its next N reads answer 503
        self.requests = []        # (method, path, X-Request-ID, NHSD-End-User-Organisation-ODS) of every call
        self.token_requests = 0
        self.refusals = []        # why assertions were refused


def outcome(code, status_code, display, diagnostics=""):
    return {
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": "error", "code": code,
            "details": {"coding": [{
                "system": "https://fhir.nhs.uk/R4/CodeSystem/Spine-ErrorOrWarningCode",
                "version": "1", "code": status_code, "display": display}]},
            "diagnostics": diagnostics,
        }],
    }


class Handler(BaseHTTPRequestHandler):
    server_version = "pds-double"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    @property
    def state(self):
        return self.server.state

    def send(self, status, body, content_type="application/fhir+json", headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def common(self):
        """Outage, delay and throttling; True when already answered."""
        with self.state.lock:
            self.state.requests.append(
                (self.command, self.path, self.headers.get("X-Request-ID", ""),
                 self.headers.get("NHSD-End-User-Organisation-ODS", "")))
            down, delay = self.state.down, self.state.delay_ms
            throttled = self.state.throttle > 0
            if throttled:
                self.state.throttle -= 1
        if delay:
            time.sleep(delay / 1000)
        if down:
            self.send(503, outcome("exception", "SERVICE_UNAVAILABLE", "Service unavailable"))
            return True
        if throttled:
            self.send(429, outcome("throttled", "TOO_MANY_REQUESTS", "Too many requests"),
                      headers=[("Retry-After", "1")])
            return True
        return False

    # -- control ---------------------------------------------------------------
    def control_get(self):
        with self.state.lock:
            self.send(200, {
                "requests": self.state.requests,
                "token_requests": self.state.token_requests,
                "refusals": self.state.refusals,
                "patients": sorted(self.state.patients),
            }, "application/json")

    def control_post(self):
        change = json.loads(self.body() or b"{}")
        with self.state.lock:
            for key in ("down", "delay_ms", "throttle", "flaky"):
                if key in change:
                    setattr(self.state, key, change[key])
            for nhs, p in change.get("patients", {}).items():
                if p is None:
                    self.state.patients.pop(nhs, None)
                else:
                    self.state.patients[nhs] = patient(nhs, **p)
            if change.get("expire_tokens"):
                self.state.tokens.clear()
        self.send(200, {"ok": True}, "application/json")

    # -- OAuth 2.0 token endpoint -----------------------------------------------
    def token(self):
        with self.state.lock:
            self.state.token_requests += 1
        if self.common():
            return
        form = {k: v[0] for k, v in parse_qs(self.body().decode()).items()}
        refuse = lambda why: self.refuse_token(why)
        if form.get("grant_type") != "client_credentials":
            return refuse("grant_type is missing or not client_credentials")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            return refuse("client_assertion_type is missing or invalid")
        assertion = form.get("client_assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return refuse("Malformed JWT in client_assertion")
        if header.get("alg") != "RS512":
            return refuse("Invalid 'alg' header in client_assertion JWT - unsupported JWT algorithm")
        if header.get("kid") != self.state.kid:
            return refuse("Invalid 'kid' header in client_assertion JWT - no matching public key")
        audience = f"http://{self.headers.get('Host')}/oauth2/token"
        try:
            claims = jwt.decode(assertion, self.state.public_key, algorithms=["RS512"],
                                audience=audience,
                                options={"require": ["iss", "sub", "aud", "jti", "exp"]})
        except jwt.InvalidAudienceError:
            return refuse("Missing or invalid 'aud' claim in client_assertion JWT")
        except jwt.ExpiredSignatureError:
            return refuse("Invalid 'exp' claim in client_assertion JWT - JWT has expired")
        except jwt.PyJWTError as e:
            return refuse(f"Invalid client_assertion JWT: {type(e).__name__}")
        if claims["iss"] != self.state.api_key or claims["sub"] != self.state.api_key:
            return refuse("Invalid 'iss'/'sub' claims in client_assertion JWT")
        if claims["exp"] > time.time() + 300:
            return refuse("Invalid 'exp' claim in client_assertion JWT - more than 5 minutes in future")
        with self.state.lock:
            if claims["jti"] in self.state.jtis:
                return refuse("Non-unique 'jti' claim in client_assertion JWT")
            self.state.jtis.add(claims["jti"])
            token = secrets.token_urlsafe(24)
            self.state.tokens[token] = time.time() + 599
        self.send(200, {"access_token": token, "expires_in": "599", "token_type": "Bearer",
                        "issued_at": str(int(time.time() * 1000))}, "application/json")

    def refuse_token(self, why):
        with self.state.lock:
            self.state.refusals.append(why)
        self.send(400, {"error": "invalid_request", "error_description": why}, "application/json")

    # -- Patient read -----------------------------------------------------------------
    def patient(self, nhs):
        request_id = self.headers.get("X-Request-ID")
        mirror = [("X-Request-ID", request_id)] if request_id else []
        auth = self.headers.get("Authorization", "")
        with self.state.lock:
            expiry = self.state.tokens.get(auth.removeprefix("Bearer "))
        if not auth.startswith("Bearer ") or not expiry or expiry < time.time():
            return self.send(401, outcome("forbidden", "ACCESS_DENIED", "Access Denied - Unauthorised",
                                          "Invalid access token"), headers=mirror)
        if not request_id:
            return self.send(400, outcome("structure", "MISSING_VALUE", "Required value is missing",
                                          "Invalid request with error - X-Request-ID header must be supplied to access this resource"))
        if len(request_id) != 36 or not set(request_id) <= UUID_CHARS:
            return self.send(400, outcome("value", "INVALID_VALUE", "Provided value is invalid",
                                          "Invalid value - 'X-Request-ID' in header"), headers=mirror)
        if self.common():
            return
        if not valid_nhs_number(nhs) or nhs == REFUSED_ID:
            return self.send(400, outcome("value", "INVALID_RESOURCE_ID", "Resource Id is invalid"),
                             headers=mirror)
        if nhs == THROTTLED:
            return self.send(429, outcome("throttled", "TOO_MANY_REQUESTS", "Too many requests"),
                             headers=mirror + [("Retry-After", "1")])
        with self.state.lock:
            flaky = self.state.flaky.get(nhs, 0)
            if flaky:
                self.state.flaky[nhs] = flaky - 1
        if flaky:
            return self.send(503, outcome("exception", "SERVICE_UNAVAILABLE", "Service unavailable"),
                             headers=mirror)
        if nhs == SLOW:
            time.sleep(5)
        if nhs == UNREADABLE:
            return self.send(200, {"resourceType": "Patient", "id": 12}, headers=mirror)
        if nhs == INVALIDATED:
            return self.send(404, outcome("not_found", "INVALIDATED_RESOURCE", "Resource that has been marked as invalid was requested - invalid resources cannot be retrieved"), headers=mirror)
        with self.state.lock:
            found = self.state.patients.get(nhs)
        if found is None:
            return self.send(404, outcome("not_found", "RESOURCE_NOT_FOUND", "Resource not found"),
                             headers=mirror)
        self.send(200, found, headers=mirror + [("ETag", 'W/"1"')])

    def do_GET(self):
        if self.path == "/_control":
            return self.control_get()
        prefix = FHIR_BASE + "/Patient/"
        if self.path.startswith(prefix):
            return self.patient(self.path[len(prefix):])
        self.send(404, outcome("not_found", "INVALID_URL", "Invalid URL"))

    def do_POST(self):
        if self.path == "/_control":
            return self.control_post()
        if self.path == "/oauth2/token":
            return self.token()
        self.send(404, outcome("not_found", "INVALID_URL", "Invalid URL"))


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that gave up waiting (a time-out test) closed its end.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--kid", required=True)
    ap.add_argument("--key-out", required=True, help="where to write the client's private key (PEM)")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with open(args.key_out, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    server = Server(("127.0.0.1", args.port), Handler)
    server.state = State(args.api_key, args.kid, key.public_key())
    print(json.dumps({
        "port": server.server_address[1], "private_key": args.key_out,
        "scenarios": {"registered": REGISTERED, "not_connected": NOT_CONNECTED,
                      "no_practice": NO_PRACTICE, "old_number": OLD_NUMBER,
                      "new_number": NEW_NUMBER, "deceased": DECEASED,
                      "restricted": RESTRICTED, "invalidated": INVALIDATED,
                      "slow": SLOW, "throttled": THROTTLED, "unreadable": UNREADABLE,
                      "refused_id": REFUSED_ID},
    }), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
