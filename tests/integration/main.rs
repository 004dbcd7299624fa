//! The integration tests: one binary (it links once), one module per subject.
//! Each module starts the real server or binary on 127.0.0.1 with real TLS
//! where it speaks to the gateway; `support` starts and stops them.

mod admin_cli;
mod audit_tamper;
mod authorisation;
mod bad_input;
mod claim_brute_force;
mod cli;
mod clinical_e2e;
mod clinical_fidelity;
mod clinical_formats;
mod clinical_generated;
mod clinical_limits;
mod crash;
mod dashboard;
mod demo;
mod durability;
mod handlers;
mod handover_e2e;
mod handshake_flood;
mod health;
mod hostile_values;
mod identity_e2e;
mod journey_e2e;
mod journey_model;
mod limits;
mod logs;
mod mesh;
mod metrics;
mod mllp;
mod newcomer;
mod no_patient_data;
mod operability;
mod pds;
mod restore;
mod retention;
mod safety_case;
mod security_tls;
mod store_barrier;
mod store_model;
mod store_upgrade;
mod support;
mod traces;
mod treatment;
