//! Passwords given on the command line (`--role-password ROLE=env:VAR|file:PATH`), and the SCRAM verifiers
//! made of them here: the target never sees a password.

use crate::error::Error;

/// A password given for a role whose verifier cannot be read (`--role-password ROLE=env:VAR|file:PATH`).
#[derive(Clone)]
pub struct GivenPassword {
    pub role: String,
    pub password: String,
}

impl std::fmt::Debug for GivenPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GivenPassword({}, ..)", self.role)
    }
}

/// Parses `ROLE=env:VAR` or `ROLE=file:PATH` and reads the password (a file's trailing newline is not part
/// of it). The role name is everything before the last `=env:` or `=file:`.
pub fn given_password(spec: &str) -> Result<GivenPassword, Error> {
    let usage = || {
        Error::Usage(format!(
            "--role-password takes ROLE=env:VARIABLE or ROLE=file:PATH, not {:?}",
            spec.split('=').next().unwrap_or_default()
        ))
    };
    let (role, source) = if let Some(i) = spec.rfind("=env:") {
        (&spec[..i], &spec[i + 1..])
    } else if let Some(i) = spec.rfind("=file:") {
        (&spec[..i], &spec[i + 1..])
    } else {
        return Err(usage());
    };
    if role.is_empty() {
        return Err(usage());
    }
    let password = if let Some(var) = source.strip_prefix("env:") {
        std::env::var(var).map_err(|_| {
            Error::Usage(format!(
                "--role-password {role}=env:{var}: the environment variable {var} is not set"
            ))
        })?
    } else {
        let path = source.strip_prefix("file:").unwrap_or_default();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Usage(format!(
                "--role-password {role}=file:{path}: cannot read it ({e})"
            ))
        })?;
        text.trim_end_matches(['\n', '\r']).to_string()
    };
    if password.is_empty() {
        return Err(Error::Usage(format!(
            "--role-password for {role}: the password is empty"
        )));
    }
    Ok(GivenPassword {
        role: role.to_string(),
        password,
    })
}

/// A SCRAM-SHA-256 verifier of `password`, made here: the target never sees the password itself.
pub fn scram(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_passwords_are_read_from_the_environment_or_a_file() {
        // SAFETY: a variable only this test reads
        unsafe { std::env::set_var("HIKKOSHI_TEST_ROLE_PW", "from-env") };
        let g = given_password("a=b=env:HIKKOSHI_TEST_ROLE_PW").unwrap();
        assert_eq!((g.role.as_str(), g.password.as_str()), ("a=b", "from-env"));
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "from-file\n").unwrap();
        let g = given_password(&format!("app=file:{}", f.path().display())).unwrap();
        assert_eq!(g.password, "from-file");
        assert!(matches!(given_password("app=s3cret"), Err(Error::Usage(_))));
        let Err(Error::Usage(why)) = given_password("app=env:HIKKOSHI_TEST_NOT_SET") else {
            panic!("an unset variable was accepted");
        };
        assert!(why.contains("not set"), "{why}");
    }
}
