//! The rank environment contract: exactly torchrun's variable names (so existing scripts and tools
//! work under our launcher) plus the rendezvous store's secret token.
//!
//! The launcher builds one [`RankEnv`] per rank and exports it with [`RankEnv::to_env_vars`]; a
//! rank reads it back with [`RankEnv::from_env`]. A process started without a launcher (no
//! `RANK`/`WORLD_SIZE`) gets [`RankEnv::single`]: world size 1, rank 0.
use std::fmt;

use thiserror::Error;

/// Environment variable carrying the rendezvous store's secret token (not a torchrun variable).
pub const STORE_TOKEN_VAR: &str = "LLAVA_SCO_STORE_TOKEN";
/// The launcher invocation a rank belongs to: drawn at random by node 0's launcher, the same on
/// every node and across its restarts, different for every invocation (even one reusing a run id).
pub const LAUNCH_ID_VAR: &str = "LLAVA_SCO_LAUNCH_ID";
/// Set for ranks whose stderr the launcher echoes with a `[rank r]` prefix (`--tee`).
pub const PREFIXED_STDERR_VAR: &str = "LLAVA_SCO_PREFIXED_STDERR";
/// Set for ranks whose stderr the launcher relays unchanged to its own terminal (no `--tee`
/// prefix, not only to a log file); the value is the terminal's width in columns. The trainer then
/// draws rank 0's progress bar, as tqdm does under torchrun (whose ranks inherit the terminal).
pub const STDERR_TERMINAL_VAR: &str = "LLAVA_SCO_STDERR_TERMINAL";
/// torchrun's default `MASTER_ADDR` and `MASTER_PORT`.
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";
pub const DEFAULT_MASTER_PORT: u16 = 29500;
/// torchrun's only role name.
pub const DEFAULT_ROLE: &str = "default";

/// Everything a rank learns from its launcher.
#[derive(Clone, PartialEq, Eq)]
pub struct RankEnv {
    /// `RANK`: global rank in `0..world_size`.
    pub rank: usize,
    /// `LOCAL_RANK`: rank on this node (the GPU index to use).
    pub local_rank: usize,
    /// `WORLD_SIZE`: ranks over all nodes.
    pub world_size: usize,
    /// `LOCAL_WORLD_SIZE`: ranks on this node.
    pub local_world_size: usize,
    /// `GROUP_RANK`: this node's rank (torchrun's `--node-rank`).
    pub group_rank: usize,
    /// `GROUP_WORLD_SIZE`: number of nodes.
    pub group_world_size: usize,
    /// `ROLE_RANK` / `ROLE_WORLD_SIZE` / `ROLE_NAME`: torchrun has one role, so these equal the global ones.
    pub role_rank: usize,
    pub role_world_size: usize,
    pub role_name: String,
    /// `MASTER_ADDR` / `MASTER_PORT`: where node 0's launcher serves the rendezvous store.
    pub master_addr: String,
    pub master_port: u16,
    /// `TORCHELASTIC_RESTART_COUNT`: 0 on the first attempt, +1 per group restart.
    pub restart_count: u32,
    /// `TORCHELASTIC_MAX_RESTARTS`.
    pub max_restarts: u32,
    /// `TORCHELASTIC_RUN_ID`.
    pub run_id: String,
    /// `LLAVA_SCO_STORE_TOKEN`: the secret every store connection presents (None outside a launcher).
    pub store_token: Option<String>,
    /// `LLAVA_SCO_LAUNCH_ID` ([`LAUNCH_ID_VAR`]; None outside this launcher).
    pub launch_id: Option<String>,
}

// Hand-written so the token never lands in a log line.
impl fmt::Debug for RankEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RankEnv")
            .field("rank", &self.rank)
            .field("local_rank", &self.local_rank)
            .field("world_size", &self.world_size)
            .field("local_world_size", &self.local_world_size)
            .field("group_rank", &self.group_rank)
            .field("group_world_size", &self.group_world_size)
            .field("master", &self.store_endpoint())
            .field("restart_count", &self.restart_count)
            .field("max_restarts", &self.max_restarts)
            .field("run_id", &self.run_id)
            .field(
                "store_token",
                &self.store_token.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

/// Why the environment could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("environment variable {var} is not set ({hint})")]
    Missing {
        var: &'static str,
        hint: &'static str,
    },
    #[error("environment variable {var}={value:?} is not {expected}")]
    Invalid {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("inconsistent rank environment: {0} (start ranks with `launcher` or torchrun, or fix the variables)")]
    Inconsistent(String),
}

impl RankEnv {
    /// The environment of a process run alone: world size 1, rank 0, torchrun's default master.
    pub fn single() -> Self {
        RankEnv {
            rank: 0,
            local_rank: 0,
            world_size: 1,
            local_world_size: 1,
            group_rank: 0,
            group_world_size: 1,
            role_rank: 0,
            role_world_size: 1,
            role_name: DEFAULT_ROLE.to_string(),
            master_addr: DEFAULT_MASTER_ADDR.to_string(),
            master_port: DEFAULT_MASTER_PORT,
            restart_count: 0,
            max_restarts: 0,
            run_id: "none".to_string(),
            store_token: None,
            launch_id: None,
        }
    }

    /// Reads the process environment (the trainer's side of the contract).
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the contract through `lookup` (testable without touching the process environment).
    ///
    /// Without `RANK` and `WORLD_SIZE` the result is [`RankEnv::single`]. With them, torchrun's other
    /// variables default the way a hand-written `RANK=.. WORLD_SIZE=..` launch expects (one node).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let get = |var: &str| lookup(var).filter(|v| !v.is_empty());
        if get("RANK").is_none() && get("WORLD_SIZE").is_none() {
            let mut env = Self::single();
            // A lone process may still be pointed at a store (e.g. a tool joining a running job).
            if let Some(addr) = get("MASTER_ADDR") {
                env.master_addr = addr;
            }
            if let Some(port) = parse_opt::<u16>(&get, "MASTER_PORT", "a TCP port (1-65535)")? {
                env.master_port = port;
            }
            env.store_token = get(STORE_TOKEN_VAR);
            return Ok(env);
        }
        let hint = "both RANK and WORLD_SIZE are needed";
        let rank = parse_opt::<usize>(&get, "RANK", "a rank (0, 1, ...)")?
            .ok_or(EnvError::Missing { var: "RANK", hint })?;
        let world_size = parse_opt::<usize>(&get, "WORLD_SIZE", "a positive count")?.ok_or(
            EnvError::Missing {
                var: "WORLD_SIZE",
                hint,
            },
        )?;
        let group_world_size =
            parse_opt(&get, "GROUP_WORLD_SIZE", "a positive count")?.unwrap_or(1);
        let group_rank = parse_opt(&get, "GROUP_RANK", "a node rank")?.unwrap_or(0);
        let local_world_size = match parse_opt(&get, "LOCAL_WORLD_SIZE", "a positive count")? {
            Some(n) => n,
            None if group_world_size == 1 => world_size,
            None => {
                return Err(EnvError::Missing {
                    var: "LOCAL_WORLD_SIZE",
                    hint: "needed when GROUP_WORLD_SIZE > 1",
                })
            }
        };
        let local_rank = match parse_opt(&get, "LOCAL_RANK", "a local rank (0, 1, ...)")? {
            Some(r) => r,
            None if group_world_size == 1 => rank,
            None => {
                return Err(EnvError::Missing {
                    var: "LOCAL_RANK",
                    hint: "needed when GROUP_WORLD_SIZE > 1",
                })
            }
        };
        let env = RankEnv {
            rank,
            local_rank,
            world_size,
            local_world_size,
            group_rank,
            group_world_size,
            role_rank: parse_opt(&get, "ROLE_RANK", "a rank")?.unwrap_or(rank),
            role_world_size: parse_opt(&get, "ROLE_WORLD_SIZE", "a positive count")?
                .unwrap_or(world_size),
            role_name: get("ROLE_NAME").unwrap_or_else(|| DEFAULT_ROLE.to_string()),
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| DEFAULT_MASTER_ADDR.to_string()),
            master_port: parse_opt(&get, "MASTER_PORT", "a TCP port (1-65535)")?
                .unwrap_or(DEFAULT_MASTER_PORT),
            restart_count: parse_opt(&get, "TORCHELASTIC_RESTART_COUNT", "a count")?.unwrap_or(0),
            max_restarts: parse_opt(&get, "TORCHELASTIC_MAX_RESTARTS", "a count")?.unwrap_or(0),
            run_id: get("TORCHELASTIC_RUN_ID").unwrap_or_else(|| "none".to_string()),
            store_token: get(STORE_TOKEN_VAR),
            launch_id: get(LAUNCH_ID_VAR),
        };
        env.validate()?;
        Ok(env)
    }

    /// Checks the invariants every rank relies on.
    pub fn validate(&self) -> Result<(), EnvError> {
        let bad = |msg: String| Err(EnvError::Inconsistent(msg));
        if self.world_size == 0 || self.local_world_size == 0 || self.group_world_size == 0 {
            return bad(
                "WORLD_SIZE, LOCAL_WORLD_SIZE and GROUP_WORLD_SIZE must be at least 1".into(),
            );
        }
        if self.rank >= self.world_size {
            return bad(format!(
                "RANK={} is not below WORLD_SIZE={}",
                self.rank, self.world_size
            ));
        }
        if self.local_rank >= self.local_world_size {
            return bad(format!(
                "LOCAL_RANK={} is not below LOCAL_WORLD_SIZE={}",
                self.local_rank, self.local_world_size
            ));
        }
        if self.local_world_size > self.world_size {
            return bad(format!(
                "LOCAL_WORLD_SIZE={} exceeds WORLD_SIZE={}",
                self.local_world_size, self.world_size
            ));
        }
        if self.group_rank >= self.group_world_size {
            return bad(format!(
                "GROUP_RANK={} is not below GROUP_WORLD_SIZE={}",
                self.group_rank, self.group_world_size
            ));
        }
        if self.master_port == 0 {
            return bad("MASTER_PORT=0 is not a port a rank can connect to".into());
        }
        Ok(())
    }

    /// The variables the launcher exports to a rank, in a stable order.
    pub fn to_env_vars(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            ("RANK", self.rank.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world_size.to_string()),
            ("GROUP_RANK", self.group_rank.to_string()),
            ("GROUP_WORLD_SIZE", self.group_world_size.to_string()),
            ("ROLE_RANK", self.role_rank.to_string()),
            ("ROLE_WORLD_SIZE", self.role_world_size.to_string()),
            ("ROLE_NAME", self.role_name.clone()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            ("TORCHELASTIC_RESTART_COUNT", self.restart_count.to_string()),
            ("TORCHELASTIC_MAX_RESTARTS", self.max_restarts.to_string()),
            ("TORCHELASTIC_RUN_ID", self.run_id.clone()),
        ];
        if let Some(token) = &self.store_token {
            vars.push((STORE_TOKEN_VAR, token.clone()));
        }
        if let Some(id) = &self.launch_id {
            vars.push((LAUNCH_ID_VAR, id.clone()));
        }
        vars
    }

    /// `host:port` of the rendezvous store.
    pub fn store_endpoint(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }

    /// Whether this is the only rank.
    pub fn is_single(&self) -> bool {
        self.world_size == 1
    }
}

fn parse_opt<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    expected: &'static str,
) -> Result<Option<T>, EnvError> {
    match get(var) {
        None => Ok(None),
        Some(value) => value
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| EnvError::Invalid {
                var,
                value,
                expected,
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn no_variables_means_single_process() {
        assert_eq!(
            RankEnv::from_lookup(lookup(&[])).unwrap(),
            RankEnv::single()
        );
    }

    #[test]
    fn round_trips_through_env_vars() {
        let env = RankEnv {
            rank: 5,
            local_rank: 1,
            world_size: 8,
            local_world_size: 4,
            group_rank: 1,
            group_world_size: 2,
            role_rank: 5,
            role_world_size: 8,
            role_name: "default".into(),
            master_addr: "gpu01".into(),
            master_port: 29400,
            restart_count: 2,
            max_restarts: 3,
            run_id: "job-7".into(),
            store_token: Some("s3cret".into()),
            launch_id: Some("0a1b2c3d".into()),
        };
        let vars = env.to_env_vars();
        let map: HashMap<String, String> =
            vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let back = RankEnv::from_lookup(|k| map.get(k).cloned()).unwrap();
        assert_eq!(back, env);
        assert!(!format!("{env:?}").contains("s3cret"));
    }

    #[test]
    fn plain_rank_and_world_size_default_to_one_node() {
        let env = RankEnv::from_lookup(lookup(&[("RANK", "1"), ("WORLD_SIZE", "2")])).unwrap();
        assert_eq!(
            (env.local_rank, env.local_world_size, env.group_world_size),
            (1, 2, 1)
        );
    }

    #[test]
    fn errors_name_the_variable() {
        let err = RankEnv::from_lookup(lookup(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(err.to_string().contains("RANK=\"x\""), "{err}");
        let err = RankEnv::from_lookup(lookup(&[("RANK", "0")])).unwrap_err();
        assert!(err.to_string().contains("WORLD_SIZE"), "{err}");
        let err = RankEnv::from_lookup(lookup(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(matches!(err, EnvError::Inconsistent(_)), "{err}");
        let err = RankEnv::from_lookup(lookup(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "4"),
            ("GROUP_WORLD_SIZE", "2"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("LOCAL_WORLD_SIZE"), "{err}");
    }
}
