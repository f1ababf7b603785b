//! Loading and validating a process's configuration.
//!
//! Every herd process reads its settings the same way: serde defaults, then an optional TOML file,
//! then environment variables with the process's prefix (`HERD_GATEWAY_…`, `HERD_WORKER_…`; nested
//! keys joined by `__`, e.g. `HERD_GATEWAY_HEALTH__INTERVAL=500ms`). Unknown keys are errors, so a
//! typo never silently falls back to a default. After parsing, [`Validate::validate`] checks values
//! that serde can't (ranges, relations between keys). Any failure is one [`ConfigError`] naming the
//! key and the problem; binaries print it and exit with status 2 ([`exit_on_error`]).

use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;

/// A configuration problem: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending key (`health.interval`), or `config` when no key applies.
    pub key: String,
    /// What is wrong, in a few words.
    pub problem: String,
}

impl ConfigError {
    /// A problem with one key.
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config error: {}: {}", self.key, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// Checks that serde can't express: ranges and relations between keys.
pub trait Validate {
    /// Returns the first problem found, naming its key.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Where a process's configuration comes from.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    /// Optional TOML file; when given it must exist.
    pub file: Option<&'a Path>,
    /// Environment prefix without the trailing underscore, e.g. `HERD_GATEWAY`.
    pub env_prefix: &'a str,
    /// Keys whose environment value is a comma-separated list (e.g. `workers`).
    pub env_list_keys: &'a [&'a str],
}

/// Loads `T` from defaults, the file and the environment, then validates it.
pub fn load<T: DeserializeOwned + Validate>(source: &Source<'_>) -> Result<T, ConfigError> {
    load_with_env(source, None)
}

/// Like [`load`], but with an explicit environment instead of the process's (for tests).
pub fn load_with_env<T: DeserializeOwned + Validate>(
    source: &Source<'_>,
    env: Option<std::collections::HashMap<String, String>>,
) -> Result<T, ConfigError> {
    let mut builder = ::config::Config::builder();
    if let Some(file) = source.file {
        if !file.is_file() {
            return Err(ConfigError::new(
                "config",
                format!("file {} does not exist or is not a file", file.display()),
            ));
        }
        builder = builder.add_source(
            ::config::File::from(file)
                .format(::config::FileFormat::Toml)
                .required(true),
        );
    }
    let mut environment = ::config::Environment::with_prefix(source.env_prefix)
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .source(env);
    // With a separator but no list keys, the config crate splits *every* value on commas, so a
    // plain string like an id would arrive as a list: only set it when there are list keys.
    if !source.env_list_keys.is_empty() {
        environment = environment.list_separator(",");
        for key in source.env_list_keys {
            environment = environment.with_list_parse_key(key);
        }
    }
    let settings = builder
        .add_source(environment)
        .build()
        .map_err(from_config_crate)?;
    let value: T = settings.try_deserialize().map_err(from_config_crate)?;
    value.validate()?;
    Ok(value)
}

/// Prints the error as one line on stderr and exits with status 2.
pub fn exit_on_error<T>(result: Result<T, ConfigError>) -> T {
    match result {
        Ok(value) => value,
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(2);
        }
    }
}

/// Turns the config crate's error into one naming the key where it can.
fn from_config_crate(error: ::config::ConfigError) -> ConfigError {
    use ::config::ConfigError as E;
    match error {
        E::Type {
            key,
            unexpected,
            expected,
            ..
        } => ConfigError::new(
            key.unwrap_or_else(|| "config".into()),
            format!("expected {expected}, found {unexpected}"),
        ),
        E::At { error, key, .. } => {
            let inner = from_config_crate(*error);
            match key {
                Some(key) if inner.key == "config" => ConfigError::new(key, inner.problem),
                Some(key) if !inner.key.starts_with(&key) => {
                    ConfigError::new(format!("{key}.{}", inner.key), inner.problem)
                }
                _ => inner,
            }
        }
        E::FileParse { uri, cause } => ConfigError::new(
            "config",
            format!(
                "cannot parse {}: {}",
                uri.unwrap_or_else(|| "file".into()),
                one_line(&cause.to_string())
            ),
        ),
        E::NotFound(key) => ConfigError::new(key, "missing"),
        E::Message(message) => message_to_error(&message),
        other => ConfigError::new("config", one_line(&other.to_string())),
    }
}

/// serde's messages carry the key only inside the text: "unknown field `x`, expected one of …",
/// "missing field `x`", "invalid value: … for key `a.b`". Pull the key out where there is one.
fn message_to_error(message: &str) -> ConfigError {
    let message = one_line(message);
    let (text, key) = match message.rsplit_once(" for key `") {
        Some((text, rest)) => (text.to_string(), rest.trim_end_matches('`').to_string()),
        None => (message.clone(), String::new()),
    };
    let field = text
        .split_once('`')
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(field, _)| field.to_string());
    let key = match (
        key.is_empty(),
        text.starts_with("unknown field") || text.starts_with("missing field"),
        field,
    ) {
        (true, true, Some(field)) => field,
        (false, true, Some(field)) => format!("{key}.{field}"),
        (false, _, _) => key,
        (true, _, _) => "config".to_string(),
    };
    let problem = if text.starts_with("unknown field") {
        // Keep the list of valid keys: it is the fastest way for a user to spot a typo.
        text.replacen("unknown field", "unknown key", 1)
    } else if text.starts_with("missing field") {
        "missing (required)".to_string()
    } else {
        text
    };
    ConfigError::new(key, problem)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Helpers for [`Validate`] implementations.
pub mod check {
    use super::ConfigError;
    use std::time::Duration;

    /// `value` must be in `min..=max`.
    pub fn range<T: PartialOrd + std::fmt::Display>(
        key: &str,
        value: T,
        min: T,
        max: T,
    ) -> Result<(), ConfigError> {
        if value < min || value > max {
            return Err(ConfigError::new(
                key,
                format!("must be between {min} and {max}, got {value}"),
            ));
        }
        Ok(())
    }

    /// `value` must be a duration of at least `min`.
    pub fn at_least(key: &str, value: Duration, min: Duration) -> Result<(), ConfigError> {
        if value < min {
            return Err(ConfigError::new(
                key,
                format!(
                    "must be at least {}, got {}",
                    humantime_serde::re::humantime::format_duration(min),
                    humantime_serde::re::humantime::format_duration(value)
                ),
            ));
        }
        Ok(())
    }

    /// `value` must not be empty.
    pub fn not_empty(key: &str, value: &str) -> Result<(), ConfigError> {
        if value.trim().is_empty() {
            return Err(ConfigError::new(key, "must not be empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::HashMap;
    use std::time::Duration;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Health {
        #[serde(with = "humantime_serde")]
        interval: Duration,
        rise: u32,
    }

    impl Default for Health {
        fn default() -> Self {
            Health {
                interval: Duration::from_secs(1),
                rise: 2,
            }
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[allow(dead_code)] // parsed to check its errors, never read
        listen: std::net::SocketAddr,
        #[serde(default)]
        workers: Vec<String>,
        #[serde(default)]
        health: Health,
    }

    impl Validate for Sample {
        fn validate(&self) -> Result<(), ConfigError> {
            check::range("health.rise", self.health.rise, 1, 10)
        }
    }

    fn load_toml(toml: &str, env: &[(&str, &str)]) -> Result<Sample, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load_with_env(
            &Source {
                file: Some(&path),
                env_prefix: "HERD_TEST",
                env_list_keys: &["workers"],
            },
            Some(env),
        )
    }

    #[test]
    fn file_and_env_merge_with_env_winning() {
        let sample = load_toml(
            "listen = \"127.0.0.1:1\"\n[health]\ninterval = \"250ms\"\n",
            &[
                ("HERD_TEST_HEALTH__RISE", "3"),
                ("HERD_TEST_WORKERS", "a:1,b:2"),
            ],
        )
        .unwrap();
        assert_eq!(sample.health.interval, Duration::from_millis(250));
        assert_eq!(sample.health.rise, 3);
        assert_eq!(sample.workers, vec!["a:1", "b:2"]);
    }

    #[test]
    fn without_list_keys_strings_stay_strings() {
        #[derive(Debug, Deserialize)]
        struct Plain {
            id: String,
        }
        impl Validate for Plain {
            fn validate(&self) -> Result<(), ConfigError> {
                Ok(())
            }
        }
        let env = HashMap::from([("HERD_PLAIN_ID".to_string(), "w1".to_string())]);
        let plain: Plain = load_with_env(
            &Source {
                file: None,
                env_prefix: "HERD_PLAIN",
                env_list_keys: &[],
            },
            Some(env),
        )
        .unwrap();
        assert_eq!(plain.id, "w1");
    }

    #[test]
    fn bad_duration_names_the_key() {
        let error = load_toml(
            "listen = \"127.0.0.1:1\"\n[health]\ninterval = \"soon\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(error.key, "health.interval", "{error}");
    }

    #[test]
    fn unknown_key_is_an_error() {
        let error = load_toml("listen = \"127.0.0.1:1\"\nlisten_typo = 1\n", &[]).unwrap_err();
        assert_eq!(error.key, "listen_typo", "{error}");
        assert!(error.problem.contains("unknown key"), "{error}");
    }

    #[test]
    fn missing_required_key_is_named() {
        let error = load_toml("", &[]).unwrap_err();
        assert_eq!(error.key, "listen", "{error}");
    }

    #[test]
    fn bad_address_from_env_is_named() {
        let error = load_toml("", &[("HERD_TEST_LISTEN", "nowhere")]).unwrap_err();
        assert_eq!(error.key, "listen", "{error}");
    }

    #[test]
    fn validate_runs_after_parsing() {
        let error = load_toml("listen = \"127.0.0.1:1\"\n[health]\nrise = 0\n", &[]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "config error: health.rise: must be between 1 and 10, got 0"
        );
    }

    #[test]
    fn missing_file_is_an_error() {
        let error = load::<Sample>(&Source {
            file: Some(Path::new("/nonexistent/herd.toml")),
            env_prefix: "HERD_TEST_NONE",
            env_list_keys: &[],
        })
        .unwrap_err();
        assert_eq!(error.key, "config");
    }
}
