//! What the host says about memory: `/proc/meminfo`, `/proc/slabinfo`, the sandboxes' cgroups
//! and their agents' `smaps_rollup`. Read as root on the server's machine.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// `/proc/meminfo` fields, in KiB.
pub type MemInfo = BTreeMap<String, u64>;

/// The fields of `/proc/meminfo` the memory breakdown uses.
pub const MEMINFO_FIELDS: &[&str] = &[
    "MemAvailable",
    "MemFree",
    "AnonPages",
    "Cached",
    "Shmem",
    "Slab",
    "SReclaimable",
    "SUnreclaim",
    "KernelStack",
    "PageTables",
    "Percpu",
];

pub fn meminfo() -> MemInfo {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let kib = v.split_whitespace().next()?.parse().ok()?;
            Some((k.to_owned(), kib))
        })
        .collect()
}

/// Bytes held by each slab cache (`num_objs × objsize`); empty without root.
pub fn slabinfo() -> HashMap<String, u64> {
    let text = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?.to_owned();
            let _active: u64 = f.next()?.parse().ok()?;
            let objs: u64 = f.next()?.parse().ok()?;
            let size: u64 = f.next()?.parse().ok()?;
            Some((name, objs * size))
        })
        .collect()
}

/// The caches that grew most between two [`slabinfo`] readings, per sandbox (KiB).
pub fn slab_growth(
    before: &HashMap<String, u64>,
    after: &HashMap<String, u64>,
    sandboxes: usize,
    top: usize,
) -> Vec<(String, f64)> {
    let mut grown: Vec<(String, f64)> = after
        .iter()
        .filter_map(|(name, &bytes)| {
            let old = before.get(name).copied().unwrap_or(0);
            (bytes > old).then(|| (name.clone(), per((bytes - old) / 1024, sandboxes)))
        })
        .collect();
    grown.sort_by(|a, b| b.1.total_cmp(&a.1));
    grown.truncate(top);
    grown
}

/// `total / n` as a float (0 for no `n`).
pub fn per(total: u64, n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    total as f64 / n as f64
}

/// The host processes of each sandbox, by id (its cgroup path ends in `/<id>`), lowest pid
/// (PID 1, the agent) first.
pub fn sandbox_processes(ids: &[String]) -> HashMap<String, Vec<i32>> {
    let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut found: HashMap<String, Vec<i32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        let id = cgroup.lines().find_map(|l| {
            let last = l.rsplit('/').next()?;
            wanted.contains(last).then(|| last.to_owned())
        });
        if let Some(id) = id {
            found.entry(id).or_default().push(pid);
        }
    }
    for pids in found.values_mut() {
        pids.sort_unstable();
    }
    found
}

/// A process's memory from `/proc/<pid>/smaps_rollup`, in KiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcessMemory {
    pub rss: u64,
    pub pss: u64,
    /// Private clean + private dirty: what this process alone costs.
    pub private: u64,
}

pub fn process_memory(pid: i32) -> Option<ProcessMemory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcessMemory {
        rss: field("Rss:"),
        pss: field("Pss:"),
        private: field("Private_Clean:") + field("Private_Dirty:"),
    })
}

/// Memory charged to a sandbox's cgroup, in KiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CgroupMemory {
    pub charged: u64,
    /// Process memory (anonymous pages).
    pub anon: u64,
    /// Page cache.
    pub file: u64,
    /// Kernel memory (slab, stacks, page tables, ...).
    pub kernel: u64,
}

/// The memory cgroup directory of process `pid` (v1 controller or v2).
fn memory_cgroup_of(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            return Some(Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')));
        }
    }
    let v2 = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(|root| Path::new(root).join(v2.trim_start_matches('/')))
        .find(|p| p.join("memory.current").exists())
}

pub fn cgroup_memory(pid: i32) -> Option<CgroupMemory> {
    let dir = memory_cgroup_of(pid)?;
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let stat: HashMap<String, u64> = read("memory.stat")?
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect();
    let kib = |b: u64| b / 1024;
    if let Some(usage) = read("memory.usage_in_bytes") {
        let kmem = read("memory.kmem.usage_in_bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        return Some(CgroupMemory {
            charged: kib(usage.trim().parse().ok()?),
            anon: kib(stat.get("total_rss").copied().unwrap_or(0)),
            file: kib(stat.get("total_cache").copied().unwrap_or(0)),
            kernel: kib(kmem),
        });
    }
    Some(CgroupMemory {
        charged: kib(read("memory.current")?.trim().parse().ok()?),
        anon: kib(stat.get("anon").copied().unwrap_or(0)),
        file: kib(stat.get("file").copied().unwrap_or(0)),
        kernel: kib(stat.get("kernel").copied().unwrap_or(0)),
    })
}

/// Tasks on the host (4th field of `/proc/loadavg`) and the 1-minute load.
pub fn load() -> (f64, u64) {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut f = text.split_whitespace();
    let one = f.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let tasks = f
        .nth(2)
        .and_then(|v| v.split_once('/'))
        .and_then(|(_, t)| t.parse().ok())
        .unwrap_or(0);
    (one, tasks)
}

/// Leftovers of the sandboxes `ids` on the host: cgroup directories (any controller, one
/// or two levels down) and, with the server's data dir, state directories.
pub fn leftovers(ids: &[String], data_dir: Option<&Path>) -> Vec<String> {
    let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
        return out;
    };
    for c in controllers.flatten() {
        let Ok(parents) = std::fs::read_dir(c.path()) else {
            continue;
        };
        for p in parents.flatten().filter(|p| p.path().is_dir()) {
            let Ok(children) = std::fs::read_dir(p.path()) else {
                continue;
            };
            for child in children.flatten() {
                if child
                    .file_name()
                    .to_str()
                    .is_some_and(|n| wanted.contains(n))
                {
                    out.push(child.path().display().to_string());
                }
            }
        }
    }
    if let Some(data) = data_dir {
        for id in ids {
            let dir = data.join("sandboxes").join(id);
            if dir.exists() {
                out.push(dir.display().to_string());
            }
        }
    }
    out
}
