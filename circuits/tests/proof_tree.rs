//! The proof tree end to end, with real proofs: a batch proven through every round and
//! compression verifies from its bytes and the batch file alone, and every kind of wrong input is
//! refused. One setup (small geometry) is built once and shared by the tests of this binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use proofmesh_circuits::basic::{chunk_inputs, BasicCircuit, BasicInput};
use proofmesh_circuits::batch::Batch;
use proofmesh_circuits::final_proof::{verify, VerifyError};
use proofmesh_circuits::prover::{prove_batch, witness, JobInput, RoundReport};
use proofmesh_circuits::sample::generate_batches;
use proofmesh_circuits::setup::{CircuitKey, SetupMirror, SetupSource, SetupStore};
use proofmesh_circuits::state::replay;
use proofmesh_circuits::witness_vector::{prove, synthesize, Proof, WitnessVector};
use proofmesh_core::{Geometry, ProtocolVersion};

struct Proven {
    setup_dir: PathBuf,
    store: SetupStore,
    batches: Vec<Batch>,
    /// Final proof of `batches[1]`.
    proof: Vec<u8>,
    rounds: Vec<RoundReport>,
}

fn setup_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("setup-cache")
}

/// Batch 1 (3 transactions) and batch 2 (20 transactions: 12 basic circuits, node aggregation
/// at two depths for two of the types), chained; batch 2 proven once.
fn proven() -> &'static Proven {
    static P: OnceLock<Proven> = OnceLock::new();
    P.get_or_init(|| {
        let store = SetupStore::new(&setup_dir(), ProtocolVersion::CURRENT, Geometry::small()).unwrap();
        let batches = generate_batches(11, 16, &[3, 20], 1).unwrap();
        let mut rounds = vec![];
        let proof = prove_batch(&store, &batches[1], &mut |_| {}, &mut |r| rounds.push(r.clone())).unwrap();
        Proven { setup_dir: setup_dir(), store, batches, proof: proof.to_bytes(), rounds }
    })
}

#[test]
fn a_batch_proves_through_every_round_and_compression_and_verifies() {
    let p = proven();
    let labels: Vec<_> = p.rounds.iter().map(|r| (r.label.as_str(), r.circuits)).collect();
    assert_eq!(
        labels,
        [("basic", 12), ("leaf", 7), ("node d0", 5), ("node d1", 2), ("recursion_tip", 1), ("scheduler", 1), ("compression", 1)]
    );
    let public = verify(&p.proof, &p.batches[1].to_bytes(), &p.setup_dir).unwrap();
    assert_eq!(public.batch_number.0, 2);
    assert_eq!(public.prev_state_root, replay(&p.batches[0]).unwrap().roots.last().copied().unwrap());
}

#[test]
fn a_proof_with_one_byte_flipped_is_refused() {
    let p = proven();
    let batch = p.batches[1].to_bytes();
    let n = p.proof.len();
    for at in [0, 5, 12, 20, 30, 100, n / 3, n / 2, n - 200, n - 1] {
        let mut bad = p.proof.clone();
        bad[at] ^= 0x01;
        assert!(verify(&bad, &batch, &p.setup_dir).is_err(), "flipping byte {at} of {n} was accepted");
    }
}

#[test]
fn a_valid_proof_checked_against_another_batch_is_refused() {
    let p = proven();
    let e = verify(&p.proof, &p.batches[0].to_bytes(), &p.setup_dir).unwrap_err();
    assert!(matches!(e, VerifyError::WrongBatch { proof_batch: 2, batch: 1 }), "{e}");
    // Same number, other contents.
    let mut other = p.batches[1].clone();
    other.transactions.truncate(18);
    other.storage_accesses.truncate(36);
    let e = verify(&p.proof, &other.to_bytes(), &p.setup_dir).unwrap_err();
    assert!(matches!(e, VerifyError::WrongBatch { .. }), "{e}");
}

#[test]
fn a_batch_whose_state_root_does_not_chain_is_refused() {
    let p = proven();
    let mut broken = p.batches[1].clone();
    broken.prev_state_root = p.batches[0].prev_state_root;
    let e = prove_batch(&p.store, &broken, &mut |_| {}, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("does not chain"), "{e}");
    let e = verify(&p.proof, &broken.to_bytes(), &p.setup_dir).unwrap_err();
    assert!(matches!(e, VerifyError::Replay(_)), "{e}");
}

#[test]
fn truncated_or_garbled_batch_files_are_clear_errors() {
    let p = proven();
    let bytes = p.batches[1].to_bytes();
    let e = verify(&p.proof, &bytes[..bytes.len() - 7], &p.setup_dir).unwrap_err();
    assert!(e.to_string().contains("field `access_count` at byte 452"), "{e}");
    let e = verify(&p.proof, b"not a batch at all", &p.setup_dir).unwrap_err();
    assert!(e.to_string().contains("field `magic` at byte 0"), "{e}");
    let e = verify(&p.proof[..10], &bytes, &p.setup_dir).unwrap_err();
    assert!(matches!(e, VerifyError::Format(_)), "{e}");
}

/// Proves the first chunk of `circuit` in batch 2 after `tamper` changed its input; returns the error.
fn prove_tampered(circuit: BasicCircuit, tamper: impl FnOnce(&mut BasicInput)) -> anyhow::Error {
    let p = proven();
    let batch = &p.batches[1];
    let mut input = chunk_inputs(batch, &replay(batch).unwrap(), &Geometry::small(), circuit).remove(0);
    tamper(&mut input);
    let circuit = p.store.circuit(CircuitKey::Basic(circuit)).unwrap();
    synthesize(&circuit, witness(&circuit, &JobInput::Basic(input)).unwrap())
        .and_then(|wv| prove(&circuit, wv))
        .unwrap_err()
}

/// The storage circuit constrains the Merkle update: a witness whose path does not open to the
/// claimed root cannot be proven, even when fed straight to the circuit.
#[test]
fn a_storage_witness_that_does_not_open_to_the_root_cannot_be_proven() {
    let e = prove_tampered(BasicCircuit::StorageApplication, |input| {
        let BasicInput::StorageApplication { accesses, .. } = input else { unreachable!() };
        accesses[1].siblings[3][0] += 1;
    });
    assert!(e.to_string().starts_with("basic-3: witness generation failed"), "{e}");
}

/// The main VM enforces the transfer rules: an overdraft cannot be proven.
#[test]
fn an_overdraft_cannot_be_proven() {
    let e = prove_tampered(BasicCircuit::MainVm, |input| {
        let BasicInput::MainVm { txs, .. } = input else { unreachable!() };
        txs[0].amount = (1 << 50) + 1;
    });
    assert!(e.to_string().starts_with("basic-2:"), "{e}");
}

/// Witness vector generation and proving split across processes: the vector is written to a
/// file, another process proves it from the bytes alone, and its proof verifies with the same
/// public inputs. (Not byte-identical in general: plonky2 grinds its proof-of-work nonce in
/// parallel, and any valid nonce may win.)
#[test]
fn a_witness_vector_proves_in_another_process_to_the_same_proof() {
    let p = proven();
    let batch = &p.batches[1];
    let r = replay(batch).unwrap();
    let input = chunk_inputs(batch, &r, &Geometry::small(), BasicCircuit::MainVm).remove(1);
    let circuit = p.store.circuit(CircuitKey::Basic(BasicCircuit::MainVm)).unwrap();
    let wv = synthesize(&circuit, witness(&circuit, &JobInput::Basic(input)).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wv_path = dir.path().join("main_vm.wv");
    std::fs::write(&wv_path, wv.to_bytes()).unwrap();
    let here = prove(&circuit, WitnessVector::from_bytes(&wv.to_bytes()).unwrap()).unwrap();

    let proof_path = dir.path().join("main_vm.proof");
    let out = Command::new(env!("CARGO_BIN_EXE_proofmesh-circuits"))
        .args(["--setup-dir", p.setup_dir.to_str().unwrap(), "prove-witness", "--geometry", "small"])
        .arg("--witness-vector")
        .arg(&wv_path)
        .arg("--out")
        .arg(&proof_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let there = Proof::from_bytes(std::fs::read(&proof_path).unwrap(), &circuit.data.common).unwrap();
    assert_eq!(there.public_inputs, here.public_inputs);
    circuit.data.verify(there).unwrap();

    // A vector for one circuit is refused by another.
    let other = p.store.circuit(CircuitKey::Basic(BasicCircuit::TxHasher)).unwrap();
    let e = prove(&other, wv).unwrap_err();
    assert!(e.to_string().contains("not for basic-1"), "{e}");
}

#[test]
fn setup_data_is_built_once_then_loaded_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let key = CircuitKey::Basic(BasicCircuit::TxHasher);
    let first = SetupStore::new(dir.path(), ProtocolVersion::CURRENT, Geometry::small()).unwrap();
    let built = first.circuit(key).unwrap();
    assert!(matches!(first.sources()[&key], SetupSource::Built(_)));
    let second = SetupStore::new(dir.path(), ProtocolVersion::CURRENT, Geometry::small()).unwrap();
    let loaded = second.circuit(key).unwrap();
    assert!(matches!(second.sources()[&key], SetupSource::Loaded(_)));
    assert_eq!(built.data.verifier_only, loaded.data.verifier_only);
    // The cache is keyed by geometry: another geometry does not see it.
    let other = SetupStore::new(dir.path(), ProtocolVersion::CURRENT, Geometry { tx_chunk: 8, ..Geometry::small() }).unwrap();
    assert_ne!(other.folder(), first.folder());
}

/// Setup files in memory: what the setup store sees of the cluster's artifact store (the
/// worker's `ArtifactMirror` over a real bucket runs in the scheduler's cluster test).
#[derive(Default)]
struct MemoryMirror(Mutex<HashMap<String, Vec<u8>>>);

impl SetupMirror for MemoryMirror {
    fn fetch(&self, file: &str) -> Option<Vec<u8>> {
        self.0.lock().unwrap().get(file).cloned()
    }
    fn publish(&self, file: &str, bytes: &[u8]) {
        self.0.lock().unwrap().insert(file.to_string(), bytes.to_vec());
    }
}

#[test]
fn setup_data_built_on_one_machine_is_fetched_by_the_others_through_the_mirror() {
    let mirror = Arc::new(MemoryMirror::default());
    let key = CircuitKey::Basic(BasicCircuit::TxHasher);
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = SetupStore::new(a.path(), ProtocolVersion::CURRENT, Geometry::small()).unwrap().with_mirror(mirror.clone());
    let built = first.circuit(key).unwrap();
    assert!(matches!(first.sources()[&key], SetupSource::Built(_)));
    let folder = first.folder().file_name().unwrap().to_str().unwrap().to_string();
    let mut published: Vec<_> = mirror.0.lock().unwrap().keys().cloned().collect();
    published.sort();
    assert_eq!(published, [format!("{folder}/{}.circuit", key.name()), format!("{folder}/{}.verifier", key.name())]);

    let second = SetupStore::new(b.path(), ProtocolVersion::CURRENT, Geometry::small()).unwrap().with_mirror(mirror.clone());
    let fetched = second.circuit(key).unwrap();
    assert!(matches!(second.sources()[&key], SetupSource::Fetched(_)));
    assert_eq!(built.data.verifier_only, fetched.data.verifier_only);
    // Cached locally from then on.
    let again = SetupStore::new(b.path(), ProtocolVersion::CURRENT, Geometry::small()).unwrap().with_mirror(mirror.clone());
    again.circuit(key).unwrap();
    assert!(matches!(again.sources()[&key], SetupSource::Loaded(_)));

    // A mirror holding the circuit file but not its verifier (a publisher stopped between the
    // two) is not used: the circuit is built.
    mirror.0.lock().unwrap().retain(|k, _| k.ends_with(".circuit"));
    let third = SetupStore::new(c.path(), ProtocolVersion::CURRENT, Geometry::small()).unwrap().with_mirror(mirror.clone());
    third.circuit(key).unwrap();
    assert!(matches!(third.sources()[&key], SetupSource::Built(_)));
}
