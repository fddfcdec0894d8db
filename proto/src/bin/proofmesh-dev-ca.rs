//! `proofmesh-dev-ca DIR FILE=SUBJECT...`: writes a throwaway CA (`DIR/ca.pem`) and, for each
//! argument, `DIR/FILE.pem` and `DIR/FILE.key` with that subject (e.g. `scheduler=CN=scheduler`,
//! `admin=CN=alice,OU=admins`), valid for localhost and 127.0.0.1. For `make demo` and local
//! trials only (feature `test-ca`); production certificates come from cert-manager or your PKI.

use anyhow::Context;
use proofmesh_proto::tls::test_ca::TestCa;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().context("usage: proofmesh-dev-ca DIR FILE=SUBJECT...")?;
    let ca = TestCa::new(std::path::Path::new(&dir), "Proofmesh dev CA")?;
    for arg in args {
        let (file, subject) = arg.split_once('=').with_context(|| format!("{arg:?} is not FILE=SUBJECT"))?;
        let files = ca.issue(file, subject)?;
        println!("{} ({subject})", files.cert.display());
    }
    Ok(())
}
