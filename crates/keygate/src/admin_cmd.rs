//! `keygate admin set-password`: sets the dashboard's admin password through
//! the admin API (`PUT /api/v1/admin/password`), which stores an argon2id
//! hash. The admin token keeps working.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use reqwest::Method;
use serde_json::json;
use zeroize::Zeroizing;

use crate::cli::AdminCmd;
use crate::client::AdminClient;
use crate::paths;

pub fn main(data_dir: Option<PathBuf>, admin_url: &str, cmd: AdminCmd) -> Result<ExitCode> {
    match cmd {
        AdminCmd::SetPassword => {
            let password = read_password()?;
            let dir = paths::data_dir(data_dir).ok();
            let client = AdminClient::new(admin_url, dir.as_deref())?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(client.call(
                    Method::PUT,
                    "/api/v1/admin/password",
                    Some(json!({ "password": password.as_str() })),
                ))?;
            eprintln!(
                "keygate: admin password set; sign in to the dashboard with it or the admin token"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// From stdin when it is not a terminal (one trailing newline removed), else
/// a hidden prompt, asked twice.
fn read_password() -> Result<Zeroizing<String>> {
    let password = if std::io::stdin().is_terminal() {
        let first = Zeroizing::new(
            rpassword::prompt_password("new admin password (hidden): ")
                .context("cannot read the password from the terminal")?,
        );
        let second = Zeroizing::new(
            rpassword::prompt_password("repeat it: ")
                .context("cannot read the password from the terminal")?,
        );
        if *first != *second {
            bail!("the two passwords differ");
        }
        first
    } else {
        let mut s = Zeroizing::new(String::new());
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the password from stdin")?;
        if s.ends_with('\n') {
            s.pop();
            if s.ends_with('\r') {
                s.pop();
            }
        }
        s
    };
    if password.chars().count() < keygate_admin::MIN_PASSWORD_LEN {
        bail!(
            "the admin password must have at least {} characters",
            keygate_admin::MIN_PASSWORD_LEN
        );
    }
    Ok(password)
}
