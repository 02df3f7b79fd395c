//! Offsite copies in a real S3-compatible bucket: a single-node Garage each test starts
//! (tests/support/garage.rs of the vmkeep crate). The cases of `offsite_cases`, as on a
//! folder target, with the connection from vmkeep's config file (`[offsite.s3]`); and one
//! test with the connection from the `AWS_*` environment instead.

mod common;
#[path = "../../vmkeep/tests/support/garage.rs"]
#[allow(dead_code)]
mod garage;
mod offsite_cases;

use std::rc::Rc;

use common::*;
use offsite_cases::Backend;
use serde_json::Value;

/// A bucket of a Garage of its own, or `None` when the tests run without Garage.
fn bucket() -> Option<Backend> {
    garage::Garage::start().map(|g| Backend::S3(Rc::new(g)))
}

#[test]
fn ten_generations_sync_and_every_one_restores_bit_for_bit_from_the_target() {
    if let Some(b) = bucket() {
        offsite_cases::ten_generations_sync_and_every_one_restores_bit_for_bit_from_the_target(&b);
    }
}

#[test]
fn the_target_holds_no_plaintext_block_digest_or_vm_name() {
    if let Some(b) = bucket() {
        offsite_cases::the_target_holds_no_plaintext_block_digest_or_vm_name(&b);
    }
}

#[test]
fn two_vms_cloned_from_one_image_share_their_blocks() {
    if let Some(b) = bucket() {
        offsite_cases::two_vms_cloned_from_one_image_share_their_blocks(&b);
    }
}

#[test]
fn limit_rate_bounds_the_upload_rate() {
    if let Some(b) = bucket() {
        offsite_cases::limit_rate_bounds_the_upload_rate(&b);
    }
}

#[test]
fn without_the_key_or_with_a_wrong_key_one_clear_error_and_nothing_is_read() {
    if let Some(b) = bucket() {
        offsite_cases::without_the_key_or_with_a_wrong_key_one_clear_error_and_nothing_is_read(&b);
    }
}

#[test]
fn check_from_finds_a_flipped_byte_in_a_pack_a_deleted_pack_and_a_forged_manifest() {
    if let Some(b) = bucket() {
        offsite_cases::check_from_finds_a_flipped_byte_in_a_pack_a_deleted_pack_and_a_forged_manifest(&b);
    }
}

#[test]
fn prune_from_the_target_then_what_remains_restores() {
    if let Some(b) = bucket() {
        offsite_cases::prune_from_the_target_then_what_remains_restores(&b);
    }
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_sync_killed_halfway_resumes_and_uploads_little_twice() {
    if let Some(b) = bucket() {
        offsite_cases::a_sync_killed_halfway_resumes_and_uploads_little_twice(&b);
    }
}

#[test]
fn the_aws_environment_reaches_a_bucket_sync_restore_and_damage_is_found() {
    let Some(g) = garage::Garage::start() else {
        return;
    };
    // The variables only in the environment of the children: the other tests of this
    // binary run beside this one and must reach their buckets through their configs.
    let env = Env::new();
    for (k, v) in [
        ("AWS_ENDPOINT_URL", g.endpoint.as_str()),
        ("AWS_REGION", g.region.as_str()),
        ("AWS_ACCESS_KEY_ID", g.access_key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", g.secret_access_key.as_str()),
    ] {
        env.set_var(k, v);
    }
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
    let store = g.store(&target);
    use vmkeep::offsite::store::ObjectStore;
    let packs = store.list("packs/").unwrap();
    assert!(!packs.is_empty());
    store.delete(&packs[0].key).unwrap();
    let o = env.run(&["check", "--from", &target, "--key", key]);
    assert_eq!(o.status.code(), Some(3));
    let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(said.contains(&packs[0].key), "{said}");
    // AWS_CA_BUNDLE is read as the AWS tools read it: a bundle that is not there is one
    // line naming it, before any request.
    env.set_var("AWS_CA_BUNDLE", "/nonexistent/vmkeep-ca.pem");
    let e = env.fails(&["status", "--from", &target, "--key", key], 2);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains("/nonexistent/vmkeep-ca.pem"), "{e}");
}

/// A cron line needs no flags: `[offsite] to` and `key` in the config name the bucket and
/// the key, `[offsite.s3]` the connection. A secret file others can read is refused in
/// one line before anything is sent, and the bucket stays as it was.
#[test]
fn the_config_alone_names_the_bucket_the_key_and_a_private_secret() {
    let Some(b) = bucket() else {
        return;
    };
    let off = offsite_cases::Off::new(&b);
    let cfg = off.env.path("no-config.toml");
    let s3 = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[offsite]\nto = \"{}\"\nkey = \"{}\"\n{s3}",
            off.target,
            off.key()
        ),
    )
    .unwrap();
    let disk = off.env.disk("vda.raw", 1 << 20);
    write_at(&disk, 0, &noise(5, 1 << 20));
    off.env.backup("cron-vm", &disk, &[]);
    let r: Value = serde_json::from_str(&off.env.ok(&["sync", "--all", "--json"])).unwrap();
    assert_eq!(r["generations_synced"], 1, "{r}");
    assert_eq!(r["bytes_new"], 1 << 20, "{r}");
    let st: Value =
        serde_json::from_str(&off.env.ok(&["status", "--from", &off.target, "--json"])).unwrap();
    assert_eq!(st["vms"][0]["name"], "cron-vm", "{st}");
    let before = off.keys("");
    off.env.backup("cron-vm", &disk, &[]);
    set_mode(&off.env.path("s3-secret"), 0o644);
    let e = off.env.fails(&["sync", "--all"], 2);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains("chmod 600") && e.contains("s3-secret"), "{e}");
    assert_eq!(off.keys(""), before, "nothing was written");
}
