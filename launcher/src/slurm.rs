//! SLURM support: reading the node layout of an allocation and expanding Slurm's compressed host
//! lists (`gpu[01-04,07],cpu3` -> gpu01 gpu02 gpu03 gpu04 gpu07 cpu3).
use thiserror::Error;

/// Longest host list we expand (a typo like `n[1-999999999]` must not eat the memory).
const MAX_HOSTS: usize = 100_000;

/// A host list that cannot be expanded.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("cannot parse SLURM node list {list:?}: {reason}")]
pub struct NodeListError {
    pub list: String,
    pub reason: String,
}

/// Expands a Slurm host list. Several bracket groups in one name (`r[1-2]n[1-2]`) expand to their
/// product, in Slurm's order; zero padding follows the width of the range's first number.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, NodeListError> {
    let fail = |reason: String| NodeListError {
        list: list.to_string(),
        reason,
    };
    let mut hosts = Vec::new();
    for item in split_top_level(list).map_err(fail)? {
        let item = item.trim();
        if item.is_empty() {
            return Err(fail("empty host name".into()));
        }
        expand_item(item, &mut hosts).map_err(fail)?;
    }
    if hosts.is_empty() {
        return Err(fail("no hosts".into()));
    }
    Ok(hosts)
}

/// Splits on commas that are outside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth > 0 => return Err("nested '['".into()),
            '[' => depth = 1,
            ']' if depth == 0 => return Err("']' without '['".into()),
            ']' => depth = 0,
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("'[' without ']'".into());
    }
    items.push(&list[start..]);
    Ok(items)
}

/// Expands one name with zero or more bracket groups, appending to `out`.
fn expand_item(item: &str, out: &mut Vec<String>) -> Result<(), String> {
    let Some(open) = item.find('[') else {
        push(out, item.to_string())?;
        return Ok(());
    };
    let close = open + item[open..].find(']').ok_or("'[' without ']'")?;
    let (prefix, body, rest) = (&item[..open], &item[open + 1..close], &item[close + 1..]);
    for index in expand_ranges(body)? {
        // The rest may hold more bracket groups: expand it for each choice here.
        let mut tails = Vec::new();
        expand_item(&format!("{prefix}{index}{rest}"), &mut tails)?;
        for t in tails {
            push(out, t)?;
        }
    }
    Ok(())
}

/// `01-04,07` -> ["01", "02", "03", "04", "07"].
fn expand_ranges(body: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in body.split(',') {
        let part = part.trim();
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(format!(
                "bad range {part:?} (expected N or N-M with digits)"
            ));
        }
        let parse = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("number {s:?} too large"))
        };
        let (a, b) = (parse(lo)?, parse(hi)?);
        if a > b {
            return Err(format!("range {part:?} runs backwards"));
        }
        if b - a >= MAX_HOSTS as u64 {
            return Err(format!("range {part:?} has more than {MAX_HOSTS} hosts"));
        }
        let width = lo.len();
        for i in a..=b {
            if out.len() >= MAX_HOSTS {
                return Err(format!("more than {MAX_HOSTS} hosts"));
            }
            out.push(format!("{i:0width$}"));
        }
    }
    Ok(out)
}

fn push(out: &mut Vec<String>, host: String) -> Result<(), String> {
    if out.len() >= MAX_HOSTS {
        return Err(format!("more than {MAX_HOSTS} hosts"));
    }
    out.push(host);
    Ok(())
}

/// What an allocation tells a launcher about the node layout. Each field is the value or why SLURM's
/// variables do not give it; the launcher reads only the fields no flag overrides, so `--nnodes`,
/// `--node-rank` or `--master-addr` replace a missing or unreadable variable (a plain `salloc` shell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmLayout {
    pub job_id: String,
    pub nnodes: Result<usize, String>,
    pub node_rank: Result<usize, String>,
    /// First host of the node list: node 0, which serves the rendezvous store.
    pub master_addr: Result<String, String>,
    /// The job step (`SLURM_STEP_ID`), when run by `srun`; None in a batch script or salloc shell.
    pub step_id: Option<String>,
    /// This task's index on its node (`SLURM_LOCALID`): above 0, srun started several launchers
    /// on one node.
    pub local_id: Option<usize>,
}

impl SlurmLayout {
    /// The run id a launch in this allocation defaults to: the job id, and the step's with srun
    /// (every node of a step shares it; two steps of one job, e.g. a sweep, get their own).
    pub fn run_id(&self) -> String {
        match &self.step_id {
            Some(step) => format!("{}.{step}", self.job_id),
            None => self.job_id.clone(),
        }
    }

    /// Why this launcher must not take its layout from SLURM, for the ways a launcher is commonly
    /// misplaced in a job: several per node (`srun --ntasks-per-node=8 launcher`), or an sbatch
    /// script on several nodes run without srun (only one node runs it: the launcher would wait
    /// for the others until --rdzv-timeout). Asked only when no flag sets the layout.
    pub fn misuse(&self) -> Option<String> {
        if let Some(local) = self.local_id.filter(|&l| l > 0) {
            return Some(format!(
                "srun started several launchers on this node (this one is SLURM_LOCALID={local}): start one per node, `srun --ntasks-per-node=1 launcher ...`, each starting --nproc-per-node ranks (or give --standalone for independent runs, or --nnodes/--node-rank)"
            ));
        }
        match (&self.nnodes, &self.step_id) {
            (Ok(n), None) if *n > 1 => Some(format!(
                "SLURM job {} has {n} nodes but this launcher was not started by srun (an sbatch script runs on the first node only): write `srun --ntasks-per-node=1 launcher ...` in the script, or pass --nnodes 1 (or --standalone) for a one-node run",
                self.job_id
            )),
            _ => None,
        }
    }
}

/// Reads the layout when running inside an allocation (`SLURM_JOB_ID` set); `None` outside.
///
/// Prefers the job step's variables (what `srun` sets) over the allocation's, so `srun -N2` inside
/// a larger allocation rendezvous among its own nodes.
pub fn layout_from(lookup: impl Fn(&str) -> Option<String>) -> Option<SlurmLayout> {
    let get = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| lookup(n).filter(|v| !v.trim().is_empty()))
    };
    let job_id = get(&["SLURM_JOB_ID", "SLURM_JOBID"])?;
    let nnodes = get(&["SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"])
        .ok_or_else(|| {
            "SLURM_JOB_ID is set but SLURM_NNODES is not (run the launcher through srun, or pass --nnodes)"
                .to_string()
        })
        .and_then(|n| {
            n.trim()
                .parse()
                .map_err(|_| format!("SLURM_NNODES={n:?} is not a node count (pass --nnodes)"))
        });
    let node_rank = get(&["SLURM_NODEID"])
        .ok_or_else(|| {
            "SLURM_NODEID is not set (run the launcher through srun, or pass --node-rank)"
                .to_string()
        })
        .and_then(|r| {
            r.trim()
                .parse()
                .map_err(|_| format!("SLURM_NODEID={r:?} is not a node rank (pass --node-rank)"))
        });
    let master_addr = get(&[
        "SLURM_STEP_NODELIST",
        "SLURM_JOB_NODELIST",
        "SLURM_NODELIST",
    ])
    .ok_or_else(|| "SLURM_JOB_NODELIST is not set (pass --master-addr)".to_string())
    .and_then(|list| {
        expand_nodelist(&list)
            .map(|hosts| hosts[0].clone())
            .map_err(|e| format!("{e} (pass --master-addr)"))
    });
    Some(SlurmLayout {
        job_id,
        nnodes,
        node_rank,
        master_addr,
        step_id: get(&["SLURM_STEP_ID", "SLURM_STEPID"]).map(|s| s.trim().to_string()),
        local_id: get(&["SLURM_LOCALID"]).and_then(|l| l.trim().parse().ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &str) -> Vec<String> {
        expand_nodelist(list).unwrap()
    }

    #[test]
    fn expands_slurm_lists() {
        assert_eq!(hosts("node1"), ["node1"]);
        assert_eq!(
            hosts("gpu[01-04,07],cpu3"),
            ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]
        );
        assert_eq!(hosts("a[8-11]"), ["a8", "a9", "a10", "a11"]);
        assert_eq!(hosts("n[098-101]"), ["n098", "n099", "n100", "n101"]);
        assert_eq!(hosts("r[1-2]n[1-2]"), ["r1n1", "r1n2", "r2n1", "r2n2"]);
        assert_eq!(hosts("x[1]-ib,y"), ["x1-ib", "y"]);
        assert_eq!(
            hosts("h-a.example.com,h-b.example.com"),
            ["h-a.example.com", "h-b.example.com"]
        );
    }

    #[test]
    fn rejects_malformed_lists() {
        for bad in [
            "",
            "a,,b",
            "gpu[01-04",
            "gpu01]",
            "gpu[4-1]",
            "gpu[a-b]",
            "gpu[1-]",
            "g[[1]]",
            "n[1-9999999999]",
        ] {
            let err = expand_nodelist(bad).unwrap_err();
            assert!(
                err.to_string().contains("cannot parse SLURM node list"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn reads_an_allocation() {
        let env = |k: &str| match k {
            "SLURM_JOB_ID" => Some("77".to_string()),
            "SLURM_NNODES" => Some("2".to_string()),
            "SLURM_NODEID" => Some("1".to_string()),
            "SLURM_JOB_NODELIST" => Some("gpu[07-08]".to_string()),
            _ => None,
        };
        let layout = layout_from(env).unwrap();
        assert_eq!(
            layout,
            SlurmLayout {
                job_id: "77".into(),
                nnodes: Ok(2),
                node_rank: Ok(1),
                master_addr: Ok("gpu07".into()),
                step_id: None,
                local_id: None,
            }
        );
        // an sbatch script on 2 nodes without srun: refused (when no flag sets the layout)
        assert!(layout.misuse().unwrap().contains("not started by srun"));
        assert_eq!(layout.run_id(), "77");
        // under srun: one launcher per node is right, a second one on a node is not
        let step = |local: &'static str| {
            move |k: &str| match k {
                "SLURM_STEP_ID" => Some("3".to_string()),
                "SLURM_LOCALID" => Some(local.to_string()),
                other => env(other),
            }
        };
        let first = layout_from(step("0")).unwrap();
        assert_eq!((first.misuse(), first.run_id()), (None, "77.3".to_string()));
        let second = layout_from(step("1")).unwrap();
        assert!(second
            .misuse()
            .unwrap()
            .contains("SLURM_LOCALID=1): start one per node"));
        assert_eq!(layout_from(|_| None), None);
        // a salloc shell: only the job id; each missing field says which flag replaces it
        let bare = layout_from(|k: &str| (k == "SLURM_JOB_ID").then(|| "1".to_string())).unwrap();
        assert!(bare.nnodes.unwrap_err().contains("--nnodes"));
        assert!(bare.node_rank.unwrap_err().contains("--node-rank"));
        assert!(bare.master_addr.unwrap_err().contains("--master-addr"));
        let odd = |k: &str| match k {
            "SLURM_JOB_ID" => Some("1".to_string()),
            "SLURM_NNODES" => Some("two".to_string()),
            "SLURM_JOB_NODELIST" => Some("gpu[07-".to_string()),
            _ => None,
        };
        let odd = layout_from(odd).unwrap();
        assert!(odd
            .nnodes
            .unwrap_err()
            .contains("\"two\" is not a node count"));
        assert!(odd.master_addr.unwrap_err().contains("--master-addr"));
    }
}
