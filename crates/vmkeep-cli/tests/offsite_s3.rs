//! Offsite copies in a real S3-compatible bucket: a single-node Garage the test starts
//! (tests/support/garage.rs of the vmkeep crate). Generations of a two-disk VM are synced
//! into it, restored from it bit for bit, synced again for nothing, checked, and a deleted
//! pack is found. One test in this binary: the process environment (the AWS_* variables
//! the `vmkeep` children read) is its own.

mod common;
#[path = "../../vmkeep/tests/support/garage.rs"]
#[allow(dead_code)]
mod garage;

use common::*;
use serde_json::Value;

#[test]
fn generations_sync_to_a_real_bucket_restore_from_it_and_damage_is_found() {
    let Some(g) = garage::Garage::start() else {
        return;
    };
    for (k, v) in [
        ("AWS_ENDPOINT_URL", g.endpoint.as_str()),
        ("AWS_REGION", g.region.as_str()),
        ("AWS_ACCESS_KEY_ID", g.access_key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", g.secret_access_key.as_str()),
    ] {
        std::env::set_var(k, v);
    }
    let env = Env::new();
    let key = env.path("offsite.key");
    let key = key.to_str().unwrap();
    env.ok(&["key", "create", key]);
    let target = format!("s3://{}/host1", g.bucket);
    let vda = env.disk("vda.raw", 2 << 20);
    let vdb = env.disk("vdb.raw", 1 << 20);
    write_at(&vda, 0, &noise(1, 1 << 20));
    write_at(&vdb, 0, &noise(2, 1 << 20));
    let backup = || {
        let a = format!("vda={}", vda.display());
        let b = format!("vdb={}", vdb.display());
        env.ok(&["backup", "s3vm", "--disk", &a, "--disk", &b]);
    };
    backup();
    for k in 1..4u64 {
        write_at(&vda, k << 18, &noise(10 + k, 64 << 10));
        backup();
    }
    let sync = || -> Value {
        serde_json::from_str(&env.ok(&["sync", "s3vm", "--to", &target, "--key", key, "--json"]))
            .unwrap()
    };
    let first = sync();
    assert_eq!(first["generations_synced"], 4, "{first}");
    let again = sync();
    assert_eq!(again["generations_synced"], 0, "{again}");
    assert_eq!(again["bytes_new"], 0, "{again}");

    let out = env.path("from-bucket.raw");
    for gen in env.generations("s3vm") {
        for d in ["vda", "vdb"] {
            let _ = std::fs::remove_file(&out);
            env.ok(&[
                "restore",
                "s3vm",
                "-g",
                &gen,
                "--disk",
                d,
                "--from",
                &target,
                "--key",
                key,
                "--to",
                out.to_str().unwrap(),
            ]);
            assert!(
                std::fs::read(&out).unwrap() == env.restored("s3vm", &gen, Some(d)),
                "generation {gen} disk {d} from the bucket differs"
            );
        }
    }
    env.ok(&["check", "--from", &target, "--key", key, "--deep"]);

    // A wrong key: one clear error.
    let other = env.path("other.key");
    env.ok(&["key", "create", other.to_str().unwrap()]);
    let e = env.fails(
        &[
            "status",
            "--from",
            &target,
            "--key",
            other.to_str().unwrap(),
        ],
        2,
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains("key"), "{e}");

    // A pack deleted from the bucket: check names it (exit 3).
    let settings =
        vmkeep::offsite::s3::S3Settings::from_target(&target, &Default::default()).unwrap();
    let store = vmkeep::offsite::s3::S3Store::open(&settings).unwrap();
    use vmkeep::offsite::store::ObjectStore;
    let packs = store.list("packs/").unwrap();
    assert!(!packs.is_empty());
    store.delete(&packs[0].key).unwrap();
    let o = env.run(&["check", "--from", &target, "--key", key]);
    assert_eq!(o.status.code(), Some(3));
    let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(said.contains(&packs[0].key), "{said}");
}
