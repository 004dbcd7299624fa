#!/usr/bin/env node
// A prison releases a patient, the GP practice pulls and acknowledges the
// summary, and the prison tracks it: the whole handover contract from Node.js
// (@grpc/grpc-js with @grpc/proto-loader), over mutual TLS.
//
//   npm install --prefix examples/node
//   node examples/node/release_round_trip.js --server 127.0.0.1:7443 --certs certs
//
// `--certs` is laid out like the dev PKI (`throughcare certs init`): ca.pem and
// clients/<NAME>.pem + clients/<NAME>.key. The patient is invented (999 range).
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = path.resolve(__dirname, '..', '..', 'proto');

function option(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback;
}

const server = option('server', '127.0.0.1:7443');
const certs = option('certs', 'certs');
const tlsName = option('tls-name', 'localhost');
const prisonCode = option('prison', 'YP001');
const gpCode = option('gp', 'YG001');

const definition = protoLoader.loadSync('throughcare/v1/handover.proto', {
  includeDirs: [PROTO],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).throughcare.v1;

function client(name) {
  const creds = grpc.credentials.createSsl(
    fs.readFileSync(path.join(certs, 'ca.pem')),
    fs.readFileSync(path.join(certs, 'clients', `${name}.key`)),
    fs.readFileSync(path.join(certs, 'clients', `${name}.pem`)),
  );
  return new v1.HandoverService(server, creds, { 'grpc.ssl_target_name_override': tlsName });
}

function call(stub, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 10000);
    stub[method](request, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// Whether a refusal carries google.rpc.RetryInfo (a rate or claim limit does;
// MESSAGE_TOO_LARGE does not, and will never succeed as sent).
function saysWhenToRetry(err) {
  const details = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  return details.some((d) => Buffer.from(d).includes('google.rpc.RetryInfo'));
}

// Submit is idempotent on message_id: retry UNAVAILABLE, DEADLINE_EXCEEDED and a
// RESOURCE_EXHAUSTED that says when, with the same request; a duplicate receipt
// is a success.
// Writes a pulled delivery to disk and syncs it before it is acked.
function storeDurably(inbox, d) {
  const fd = fs.openSync(path.join(inbox, `delivery-${d.delivery_id}.json`), 'w');
  try {
    fs.writeSync(fd, JSON.stringify(d));
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

async function submitWithRetries(stub, request, attempts = 5) {
  const retryable = (err) => [grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED].includes(err.code)
    || (err.code === grpc.status.RESOURCE_EXHAUSTED && saysWhenToRetry(err));
  for (let attempt = 0; ; attempt++) {
    try {
      return await call(stub, 'Submit', request);
    } catch (err) {
      if (!retryable(err) || attempt === attempts - 1) throw err;
      await new Promise((r) => setTimeout(r, 200 * 2 ** attempt));
    }
  }
}

function releaseSummary() {
  const today = new Date().toISOString().slice(0, 10);
  return {
    patient: {
      nhs_number: '9990000026',
      family_name: 'Example (invented)',
      given_names: ['Jo'],
      date_of_birth: '1979-03-02',
      sex: 'SEX_UNKNOWN',
    },
    custody: {
      establishment: prisonCode,
      release_date: today,
      release_address: { lines: ['1 Invented Street'], city: 'Northam', postcode: 'ZZ1 1ZZ' },
    },
    registered_gp: gpCode,
    medications: [{
      code: { system: 'https://dmd.nhs.uk', code: '39695411000001103', display: 'Paracetamol 500mg tablets' },
      dose: '1 g',
      route: 'oral',
      frequency: 'four times daily when required',
    }],
    consent: { probation_sharing: 'CONSENT_DECISION_GIVEN' },
    author: { name: 'Dr Invented', role: 'Prison GP', organisation: prisonCode },
    authored_at: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
  };
}

async function main() {
  const prison = client(prisonCode);
  const messageId = `example-node-${crypto.randomUUID()}`;
  const receipt = await submitWithRetries(prison, {
    message_id: messageId,
    event: 'JOURNEY_EVENT_RELEASE',
    destinations: [gpCode],
    native: releaseSummary(),
  });
  console.log(`submitted ${messageId} as handover ${receipt.handover_id}: ${receipt.deliveries.map((d) => d.destination).join(', ')}`);

  // The practice system's own store (keyed by delivery id: a repeat overwrites itself).
  const inbox = fs.mkdtempSync(path.join(os.tmpdir(), 'practice-inbox-'));
  // The pull loop: long-poll, store each delivery, ack that attempt.
  const gp = client(gpCode);
  let mine = null;
  const deadline = Date.now() + 20000;
  while (!mine && Date.now() < deadline) {
    const pulled = await call(gp, 'Pull', { max_deliveries: 10, wait: { seconds: 2 } });
    for (const d of pulled.deliveries) {
      // Stored durably first, then acked: an ack is the gateway's licence to forget it.
      storeDurably(inbox, d);
      await call(gp, 'Ack', { delivery_id: d.delivery_id, attempt: d.attempt });
      if (d.handover_id === receipt.handover_id) mine = d;
    }
  }
  if (!mine) throw new Error('the practice never received the release');
  console.log(`${gpCode} received handover ${mine.handover_id} (delivery ${mine.delivery_id}, attempt ${mine.attempt})`);

  const status = await call(prison, 'Track', { message_id: messageId });
  for (const d of status.deliveries) console.log(`track: ${d.destination} ${d.state.replace(/^DELIVERY_STATE_/, "")}`);
  const mineStatus = status.deliveries.find((d) => d.destination === gpCode);
  if (!mineStatus || mineStatus.state !== 'DELIVERY_STATE_DELIVERED') throw new Error(`tracking says ${JSON.stringify(status.deliveries)}`);
  console.log('ok');
  prison.close();
  gp.close();
}

main().catch((err) => {
  console.error(`failed: ${err.message}`);
  process.exit(1);
});
