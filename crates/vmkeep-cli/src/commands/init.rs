//! `vmkeep init`

use anyhow::Result;
use vmkeep::archive::Repository;

use super::Ctx;

pub fn run(ctx: &Ctx) -> Result<i32> {
    let path = ctx.repo_path();
    let repo = Repository::init(&path)?;
    if ctx.json {
        crate::output::json(&serde_json::json!({"repository": path, "id": repo.profile.id}));
    } else {
        ctx.say(format!(
            "repository {} ready (id {})",
            path.display(),
            repo.profile.id
        ));
    }
    Ok(0)
}
