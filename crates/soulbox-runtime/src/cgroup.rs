//! cgroups on v1, v2 and hybrid hosts.
//!
//! The layout is read from `/proc/self/mountinfo` once. Every controller the runtime needs
//! (memory, cpu, pids) is taken from the v1 hierarchy that carries it, else from cgroup2. Where
//! cpuset and cpuacct are v1 hierarchies of their own, the sandbox gets a group (without
//! limits) there too, under the same path: lxcfs finds a process's CPU quota and usage by its
//! cpuset and cpuacct paths, as if every hierarchy had the same layout. A
//! sandbox gets a group named by its id under `<mount>/<cgroup_name>/` in each such hierarchy,
//! plus one in the cgroup2 hierarchy whenever it exists, even without controllers (hybrid
//! hosts), because `cgroup.kill` there kills a whole group atomically. Without cgroup2 the v1
//! freezer stops the group while its tasks are signalled, so none can fork away.
//!
//! The sandbox never sees this tree: it gets a cgroup namespace rooted at its own group, and
//! at `/sys/fs/cgroup` read-only mounts of its own group in each of these hierarchies (see
//! [`Cgroups::views`]), so it can read its limits but not move itself out or raise them.

use std::ffi::CString;
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use rustix::process::{PidfdFlags, pidfd_open};

use crate::{Limits, RuntimeError, error::Context, proc, valid_id};

/// CFS period; the quota is `cpu_count` of them.
const CPU_PERIOD_US: u64 = 100_000;
/// How long a freeze or thaw may take: a task in an uninterruptible sleep (D state) holds a
/// freeze up until its I/O ends.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long killing a group may take before we give up and report it.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Roles {
    memory: bool,
    cpu: bool,
    pids: bool,
    freezer: bool,
    /// v1 cpuset: new groups need `cpuset.cpus` and `cpuset.mems` before tasks can join.
    cpuset: bool,
}

#[derive(Debug)]
struct Hierarchy {
    /// Where the hierarchy is mounted.
    mount: PathBuf,
    /// `<mount>/<cgroup_name>`: the parent of every sandbox group.
    parent: PathBuf,
    v2: bool,
    roles: Roles,
    /// v1 only: the controllers bound to it (`name=…` included), as it must be mounted again.
    controllers: Vec<String>,
}

/// One hierarchy as the sandbox mounts it, from inside its cgroup namespace (so the mount's
/// root is the sandbox's own group).
#[derive(Debug)]
pub(crate) struct CgroupView {
    /// The directory under `/sys/fs/cgroup` (the host mount's name: `memory`, `unified`, …);
    /// unused when the host has a single cgroup2 hierarchy, which is `/sys/fs/cgroup` itself.
    pub(crate) dir: CString,
    pub(crate) v2: bool,
    /// v1: the controllers, each a flag of the `cgroup` filesystem.
    pub(crate) flags: Vec<CString>,
    /// v1: the `name=` of a named hierarchy.
    pub(crate) name: Option<CString>,
}

#[derive(Debug)]
pub(crate) struct Cgroups {
    hierarchies: Vec<Hierarchy>,
    /// The cgroup2 hierarchy supports `cgroup.kill` (Linux ≥ 5.14).
    v2_kill: bool,
    name: String,
}

/// One line of `/proc/self/mountinfo` that is a cgroup mount.
#[derive(Debug, PartialEq, Eq)]
struct CgroupMount {
    mount: PathBuf,
    v2: bool,
    /// v1 only: the controllers bound to this hierarchy.
    controllers: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mount), Some(fstype), Some(opts)) =
            (fields.get(4), fields.get(sep + 1), fields.get(sep + 3))
        else {
            continue;
        };
        let v2 = match *fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        out.push(CgroupMount {
            mount: PathBuf::from(unescape(mount)),
            v2,
            controllers: if v2 {
                Vec::new()
            } else {
                opts.split(',').map(str::to_owned).collect()
            },
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub(crate) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Roles {
    fn set(&mut self, controller: &str) {
        match controller {
            "memory" => self.memory = true,
            "cpu" => self.cpu = true,
            "pids" => self.pids = true,
            "freezer" => self.freezer = true,
            "cpuset" => self.cpuset = true,
            _ => {}
        }
    }
}

/// Adds `role` to the hierarchy `m`, adding the hierarchy if it is new. `known` are the
/// kernel's controller names (`/proc/cgroups`): the v1 mount options that are controllers.
fn place(
    hs: &mut Vec<Hierarchy>,
    name: &str,
    m: &CgroupMount,
    known: &[String],
    role: Option<&str>,
) {
    let i = match hs.iter().position(|h| h.mount == m.mount) {
        Some(i) => i,
        None => {
            hs.push(Hierarchy {
                mount: m.mount.clone(),
                parent: m.mount.join(name),
                v2: m.v2,
                roles: Roles::default(),
                controllers: m
                    .controllers
                    .iter()
                    .filter(|c| c.starts_with("name=") || known.contains(c))
                    .cloned()
                    .collect(),
            });
            hs.len() - 1
        }
    };
    if let Some(role) = role {
        hs[i].roles.set(role);
    }
}

fn make_parents(hs: &[Hierarchy]) -> Result<(), RuntimeError> {
    for h in hs {
        fs::create_dir_all(&h.parent).ctx(|| format!("mkdir {}", h.parent.display()))?;
        if h.roles.cpuset && !h.v2 {
            // All the root's CPUs and memory nodes, inherited by every sandbox group.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let own = fs::read_to_string(h.parent.join(file)).unwrap_or_default();
                if own.trim().is_empty() {
                    let root = fs::read_to_string(h.mount.join(file))
                        .ctx(|| format!("read {}/{file}", h.mount.display()))?;
                    write_file(&h.parent.join(file), root.trim())?;
                }
            }
            write_file(&h.parent.join("cgroup.clone_children"), "1")?;
        }
    }
    Ok(())
}

fn write_file(path: &Path, value: &str) -> Result<(), RuntimeError> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .ctx(|| format!("write {value:?} to {}", path.display()))
}

impl Cgroups {
    /// Finds the hierarchies for `name` and creates the parent groups.
    pub(crate) fn new(name: &str) -> Result<Cgroups, RuntimeError> {
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").ctx(|| "read /proc/self/mountinfo")?;
        let mounts = parse_mountinfo(&mountinfo);
        let v2_mount = mounts.iter().find(|m| m.v2);
        let v2_controllers = match v2_mount {
            Some(m) => fs::read_to_string(m.mount.join("cgroup.controllers"))
                .ctx(|| format!("read {}/cgroup.controllers", m.mount.display()))?,
            None => String::new(),
        };
        let known: Vec<String> = fs::read_to_string("/proc/cgroups")
            .ctx(|| "read /proc/cgroups")?
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        let find_v1 = |c: &str| {
            mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|x| x == c))
        };
        for controller in ["memory", "cpu", "pids"] {
            if let Some(m) = find_v1(controller) {
                place(&mut hierarchies, name, m, &known, Some(controller));
            } else if let Some(m) =
                v2_mount.filter(|_| v2_controllers.split_whitespace().any(|c| c == controller))
            {
                place(&mut hierarchies, name, m, &known, Some(controller));
            } else {
                return Err(RuntimeError::Unsupported(format!(
                    "no cgroup hierarchy has the {controller} controller"
                )));
            }
        }
        for controller in ["cpuset", "cpuacct"] {
            if let Some(m) = find_v1(controller) {
                place(&mut hierarchies, name, m, &known, Some(controller));
            }
        }
        if let Some(m) = v2_mount {
            place(&mut hierarchies, name, m, &known, None);
        }
        make_parents(&hierarchies)?;
        let v2_kill = hierarchies
            .iter()
            .any(|h| h.v2 && h.parent.join("cgroup.kill").exists());
        if !v2_kill {
            let Some(m) = find_v1("freezer") else {
                return Err(RuntimeError::Unsupported(
                    "neither cgroup.kill (cgroup2, Linux ≥ 5.14) nor the v1 freezer is available"
                        .into(),
                ));
            };
            place(&mut hierarchies, name, m, &known, Some("freezer"));
            make_parents(&hierarchies)?;
        }
        for h in hierarchies.iter().filter(|h| h.v2) {
            let enable: Vec<&str> = [
                ("+memory", h.roles.memory),
                ("+cpu", h.roles.cpu),
                ("+pids", h.roles.pids),
            ]
            .iter()
            .filter(|(_, on)| *on)
            .map(|(c, _)| *c)
            .collect();
            if !enable.is_empty() {
                let enable = enable.join(" ");
                write_file(&h.mount.join("cgroup.subtree_control"), &enable)?;
                write_file(&h.parent.join("cgroup.subtree_control"), &enable)?;
            }
        }
        Ok(Cgroups {
            hierarchies,
            v2_kill,
            name: name.to_owned(),
        })
    }

    /// Creates the sandbox's groups with its limits and returns their `cgroup.procs`, opened for
    /// writing, for the sandbox's PID 1 to move itself in before it runs anything. On error
    /// nothing is left behind.
    pub(crate) fn create(&self, id: &str, limits: &Limits) -> Result<Vec<OwnedFd>, RuntimeError> {
        let mut procs = Vec::with_capacity(self.hierarchies.len());
        for h in &self.hierarchies {
            let dir = h.parent.join(id);
            let made = fs::create_dir(&dir)
                .ctx(|| format!("mkdir {}", dir.display()))
                .and_then(|()| {
                    Self::set_limits(h, &dir, limits)?;
                    fs::OpenOptions::new()
                        .write(true)
                        .open(dir.join("cgroup.procs"))
                        .ctx(|| format!("open {}/cgroup.procs", dir.display()))
                });
            match made {
                Ok(f) => procs.push(OwnedFd::from(f)),
                Err(e) => {
                    let _ = self.remove(id);
                    return Err(e);
                }
            }
        }
        Ok(procs)
    }

    fn set_limits(h: &Hierarchy, dir: &Path, limits: &Limits) -> Result<(), RuntimeError> {
        let memory = limits.memory_mb.saturating_mul(1 << 20).to_string();
        let quota = u64::from(limits.cpu_count) * CPU_PERIOD_US;
        if h.roles.memory {
            if h.v2 {
                write_file(&dir.join("memory.max"), &memory)?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write_file(&swap, "0")?;
                }
            } else {
                write_file(&dir.join("memory.limit_in_bytes"), &memory)?;
                // Memory + swap capped at the same value: no swap on top of the limit.
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write_file(&memsw, &memory)?;
                }
            }
        }
        if h.roles.cpu {
            if h.v2 {
                write_file(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            } else {
                write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write_file(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
        if h.roles.pids {
            write_file(&dir.join("pids.max"), &limits.pids_max.to_string())?;
        }
        Ok(())
    }

    fn groups(&self, id: &str) -> impl Iterator<Item = (&Hierarchy, PathBuf)> {
        self.hierarchies.iter().map(move |h| (h, h.parent.join(id)))
    }

    /// Pids listed in the sandbox's groups (deduplicated, unordered).
    fn members(&self, id: &str) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .groups(id)
            .filter_map(|(_, dir)| fs::read_to_string(dir.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILL to `pid`, only if it is (still) in one of the sandbox's groups: the pidfd pins
    /// the process, and the membership check after opening it rules out a reused pid.
    fn kill_member(&self, id: &str, pid: i32) {
        let Some(p) = proc::pid(pid) else { return };
        let Ok(fd) = pidfd_open(p, PidfdFlags::empty()) else {
            return;
        };
        let suffix = format!("/{}/{id}", self.name);
        let member = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|s| s.lines().any(|l| l.ends_with(&suffix)));
        if member {
            proc::kill(std::os::fd::AsFd::as_fd(&fd));
        }
    }

    /// Kills every process in the sandbox's groups and waits until they are all gone.
    pub(crate) fn kill(&self, id: &str) -> Result<(), RuntimeError> {
        let kill_file = self
            .groups(id)
            .find(|(h, _)| h.v2)
            .map(|(_, dir)| dir.join("cgroup.kill"))
            .filter(|_| self.v2_kill);
        if let Some(kill_file) = kill_file {
            match fs::write(&kill_file, "1") {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).ctx(|| format!("write {}", kill_file.display()));
                }
            }
        } else if let Some((_, dir)) = self.groups(id).find(|(h, _)| h.roles.freezer) {
            self.kill_frozen(id, &dir)?;
        }
        let deadline = Instant::now() + KILL_TIMEOUT;
        let mut pause = Duration::from_micros(100);
        loop {
            let pids = self.members(id);
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::Timeout(format!(
                    "killing sandbox {id}: pids {pids:?} still in its cgroups"
                )));
            }
            for pid in pids {
                self.kill_member(id, pid);
            }
            sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    /// Freezes or thaws every task of the sandbox's groups and waits until the kernel says
    /// they all are: cgroup2's `cgroup.freeze` where the sandbox has a cgroup2 group (Linux ≥
    /// 5.2), else the v1 freezer. cgroup2 lets a fatal signal through a freeze, so a frozen
    /// sandbox is killed as any other; on v1, [`Cgroups::kill`] thaws after signalling.
    pub(crate) fn freeze(&self, id: &str, frozen: bool) -> Result<(), RuntimeError> {
        let v2 = self
            .groups(id)
            .find(|(h, dir)| h.v2 && dir.join("cgroup.freeze").exists());
        let (file, value, done): (PathBuf, &str, Box<dyn Fn() -> bool>) = match v2 {
            Some((_, dir)) => {
                let events = dir.join("cgroup.events");
                let want = if frozen { "frozen 1" } else { "frozen 0" };
                (
                    dir.join("cgroup.freeze"),
                    if frozen { "1" } else { "0" },
                    Box::new(move || {
                        fs::read_to_string(&events).is_ok_and(|e| e.lines().any(|l| l == want))
                    }),
                )
            }
            None => {
                let Some((_, dir)) = self.groups(id).find(|(h, _)| h.roles.freezer) else {
                    return Err(RuntimeError::Unsupported(
                        "no cgroup freezer (cgroup2 cgroup.freeze or the v1 freezer)".into(),
                    ));
                };
                let state = dir.join("freezer.state");
                let want = if frozen { "FROZEN" } else { "THAWED" };
                let check = state.clone();
                (
                    state,
                    want,
                    Box::new(move || fs::read_to_string(&check).is_ok_and(|s| s.trim() == want)),
                )
            }
        };
        match fs::write(&file, value) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(RuntimeError::NotFound(id.to_owned()));
            }
            Err(e) => return Err(e).ctx(|| format!("write {value} to {}", file.display())),
        }
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        let mut pause = Duration::from_micros(100);
        while !done() {
            if Instant::now() > deadline {
                return Err(RuntimeError::Timeout(format!(
                    "waiting for sandbox {id} to be {}",
                    if frozen { "frozen" } else { "thawed" }
                )));
            }
            sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        Ok(())
    }

    /// v1 without cgroup2: freeze, signal everything, thaw (the signals land on thaw), so that
    /// nothing forks between listing and signalling.
    fn kill_frozen(&self, id: &str, dir: &Path) -> Result<(), RuntimeError> {
        let state = dir.join("freezer.state");
        match fs::write(&state, "FROZEN") {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).ctx(|| format!("write {}", state.display())),
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline
            && fs::read_to_string(&state).is_ok_and(|s| s.trim() != "FROZEN")
        {
            sleep(Duration::from_micros(200));
        }
        for pid in self.members(id) {
            self.kill_member(id, pid);
        }
        write_file(&state, "THAWED")
    }

    /// Removes the sandbox's groups (they must be empty); missing ones are fine.
    pub(crate) fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        for (_, dir) in self.groups(id) {
            // An emptied group can stay busy for a moment while its last tasks are released.
            let mut tries = 0;
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 200 => {
                        tries += 1;
                        sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(e).ctx(|| format!("rmdir {}", dir.display())),
                }
            }
        }
        Ok(())
    }

    /// Ids that have a group in any hierarchy.
    pub(crate) fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .hierarchies
            .iter()
            .filter_map(|h| fs::read_dir(&h.parent).ok())
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| valid_id(n))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The hierarchies a sandbox mounts at `/sys/fs/cgroup`: those it has a group in, and no
    /// other (in the others its cgroup namespace's root would be the server's group).
    pub(crate) fn views(&self) -> Result<Vec<CgroupView>, RuntimeError> {
        let cstr = |s: &str| {
            CString::new(s).map_err(|_| RuntimeError::Unsupported(format!("cgroup option {s:?}")))
        };
        self.hierarchies
            .iter()
            .map(|h| {
                let dir = h
                    .mount
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("unified");
                let mut flags = Vec::new();
                let mut name = None;
                for c in &h.controllers {
                    match c.strip_prefix("name=") {
                        Some(n) => name = Some(cstr(n)?),
                        None => flags.push(cstr(c)?),
                    }
                }
                Ok(CgroupView {
                    dir: cstr(dir)?,
                    v2: h.v2,
                    flags,
                    name,
                })
            })
            .collect()
    }

    /// The sandbox's group directories, for tests and diagnostics.
    pub(crate) fn dirs(&self, id: &str) -> Vec<PathBuf> {
        self.groups(id).map(|(_, d)| d).collect()
    }

    /// Removes the parent groups that are empty (a non-empty one is left alone).
    pub(crate) fn remove_parents(&self) {
        for h in &self.hierarchies {
            let _ = fs::remove_dir(&h.parent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 29 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
31 29 0:27 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 29 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 29 0:31 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
37 29 0:33 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
38 29 0:34 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
39 29 0:35 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
40 24 0:36 / /mnt/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn parses_cgroup_mounts() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 7);
        assert_eq!(m[0].mount, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(m[0].controllers, vec!["rw", "cpu"]);
        assert!(!m[0].v2);
        assert_eq!(m[6].mount, PathBuf::from("/sys/fs/cgroup/unified"));
        assert!(m[6].v2);
        assert!(m[6].controllers.is_empty());
    }

    /// The v1 path (freeze, signal, thaw) that hosts without cgroup2 use, on this host's real
    /// freezer hierarchy: a forking shell loop is killed and the group emptied.
    #[test]
    fn v1_freezer_kills_a_forking_group() {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let Some(freezer) = parse_mountinfo(&mountinfo)
            .into_iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|c| c == "freezer"))
        else {
            eprintln!("SKIPPED: no v1 freezer hierarchy");
            return;
        };
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: needs root");
            return;
        }
        let name = format!("soulbox-unit-{}", std::process::id());
        let cg = Cgroups {
            hierarchies: vec![Hierarchy {
                parent: freezer.mount.join(&name),
                mount: freezer.mount,
                v2: false,
                roles: Roles {
                    freezer: true,
                    ..Roles::default()
                },
                controllers: vec!["freezer".into()],
            }],
            v2_kill: false,
            name,
        };
        make_parents(&cg.hierarchies).expect("parent");
        let id = "unittest000000000001";
        let dir = cg.hierarchies[0].parent.join(id);
        fs::create_dir(&dir).expect("group");
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "while :; do sleep 10 & sleep 0.01; done"])
            .spawn()
            .expect("spawn");
        write_file(&dir.join("cgroup.procs"), &child.id().to_string()).expect("join");
        std::thread::sleep(Duration::from_millis(100));
        assert!(cg.members(id).len() > 1, "the loop did not fork");
        cg.kill(id).expect("kill");
        assert!(cg.members(id).is_empty());
        assert!(child.wait().is_ok());
        cg.remove(id).expect("remove");
        assert!(!dir.exists());
        fs::remove_dir(&cg.hierarchies[0].parent).expect("remove parent");
    }

    /// What a sandbox mounts at `/sys/fs/cgroup`: each hierarchy by its host name, v1 ones
    /// with exactly their controllers (not mount options such as `rw` or `xattr`).
    #[test]
    fn views_name_hierarchies_and_controllers() {
        let mounts = parse_mountinfo(
            "\
30 29 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,xattr,cpu,cpuacct
33 29 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
38 29 0:34 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
39 29 0:35 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
",
        );
        let known: Vec<String> = ["cpu", "cpuacct", "memory"].map(String::from).to_vec();
        let mut hs = Vec::new();
        place(&mut hs, "sb", &mounts[0], &known, Some("cpu"));
        place(&mut hs, "sb", &mounts[0], &known, Some("cpuacct"));
        place(&mut hs, "sb", &mounts[1], &known, Some("memory"));
        place(&mut hs, "sb", &mounts[2], &known, None);
        place(&mut hs, "sb", &mounts[3], &known, None);
        let cg = Cgroups {
            hierarchies: hs,
            v2_kill: true,
            name: "sb".into(),
        };
        let views = cg.views().expect("views");
        let show: Vec<(String, bool, Vec<String>, Option<String>)> = views
            .iter()
            .map(|v| {
                let s = |c: &CString| c.to_string_lossy().into_owned();
                (
                    s(&v.dir),
                    v.v2,
                    v.flags.iter().map(s).collect(),
                    v.name.as_ref().map(s),
                )
            })
            .collect();
        assert_eq!(
            show,
            vec![
                (
                    "cpu,cpuacct".into(),
                    false,
                    vec!["cpu".into(), "cpuacct".into()],
                    None
                ),
                ("memory".into(), false, vec!["memory".into()], None),
                ("systemd".into(), false, vec![], Some("systemd".into())),
                ("unified".into(), true, vec![], None),
            ]
        );
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("/mnt/with\\040space"), "/mnt/with space");
        assert_eq!(unescape("/a\\134b"), "/a\\b");
        assert_eq!(unescape("/trailing\\04"), "/trailing\\04");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
