//! Turns mmdebstrap's `--verbose` stderr into a position on a progress bar.
//!
//! mmdebstrap announces its phases with `I: ` lines; inside the phases apt prints one `Get:` line
//! per downloaded package and dpkg one `Unpacking` and one `Setting up` line per installed
//! package, and apt states the count up front (`N newly installed`). Each phase owns a slice of
//! [`TOTAL`].

/// Length of the progress bar.
pub const TOTAL: u64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Update,
    Download,
    Extract,
    Essential,
    Remaining,
    Hooks,
    Cleanup,
    Done,
}

impl Phase {
    /// Slice of the bar owned by the phase.
    fn range(self) -> (u64, u64) {
        match self {
            Phase::Start => (0, 0),
            Phase::Update => (0, 40),
            Phase::Download => (40, 200),
            Phase::Extract => (200, 260),
            Phase::Essential => (260, 560),
            Phase::Remaining => (560, 950),
            Phase::Hooks => (950, 970),
            Phase::Cleanup => (970, TOTAL),
            Phase::Done => (TOTAL, TOTAL),
        }
    }

    fn message(self) -> &'static str {
        match self {
            Phase::Start => "starting mmdebstrap",
            Phase::Update => "updating package lists",
            Phase::Download => "downloading essential packages",
            Phase::Extract => "extracting essential packages",
            Phase::Essential => "installing essential packages",
            Phase::Remaining => "installing python3, git, curl, sudo, …",
            Phase::Hooks => "creating user `user`",
            Phase::Cleanup => "cleaning up",
            Phase::Done => "done",
        }
    }
}

/// Progress state fed line by line.
#[derive(Debug)]
pub struct Tracker {
    phase: Phase,
    /// Packages apt announced for the current phase.
    expected: u64,
    /// Progress units seen in the current phase (`Get:` and `Setting up` lines).
    seen: u64,
}

/// What the bar should show after a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub position: u64,
    pub message: &'static str,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            phase: Phase::Start,
            expected: 0,
            seen: 0,
        }
    }
}

impl Tracker {
    /// Feeds one stderr line; returns the new bar state when it changed.
    pub fn feed(&mut self, line: &str) -> Option<Update> {
        if let Some(info) = line.strip_prefix("I: ") {
            let next = if info.starts_with("running apt-get update") {
                Phase::Update
            } else if info.starts_with("downloading packages") {
                Phase::Download
            } else if info.starts_with("extracting archives") {
                Phase::Extract
            } else if info.starts_with("installing essential packages") {
                Phase::Essential
            } else if info.starts_with("installing remaining packages") {
                Phase::Remaining
            } else if info.starts_with("running --customize-hook") {
                Phase::Hooks
            } else if info.starts_with("cleaning package lists") {
                Phase::Cleanup
            } else if info.starts_with("success") {
                Phase::Done
            } else {
                return None;
            };
            if next != self.phase {
                // The essential phase installs what the download phase announced.
                if next != Phase::Extract && next != Phase::Essential {
                    self.expected = 0;
                }
                self.phase = next;
                self.seen = 0;
            }
            return Some(self.update());
        }
        if let Some(n) = newly_installed(line) {
            self.expected = n;
            return None;
        }
        let installs = line.starts_with("Unpacking ") || line.starts_with("Setting up ");
        let counts = match self.phase {
            Phase::Download => line.starts_with("Get:"),
            Phase::Essential => installs,
            Phase::Remaining => installs || line.starts_with("Get:"),
            _ => false,
        };
        if counts {
            self.seen += 1;
            return Some(self.update());
        }
        None
    }

    fn update(&self) -> Update {
        let (lo, hi) = self.phase.range();
        // Units per package: downloaded; unpacked and set up; or all three.
        let units = self.expected
            * match self.phase {
                Phase::Essential => 2,
                Phase::Remaining => 3,
                _ => 1,
            };
        let position = ((hi - lo) * self.seen.min(units))
            .checked_div(units)
            .map_or(lo, |done| lo + done);
        Update {
            position,
            message: self.phase.message(),
        }
    }
}

/// Parses apt's `0 upgraded, 69 newly installed, 0 to remove and 0 not upgraded.`
fn newly_installed(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once(" upgraded, ")?;
    let (n, _) = rest.split_once(" newly installed")?;
    n.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_newly_installed() {
        assert_eq!(
            newly_installed("0 upgraded, 69 newly installed, 0 to remove and 0 not upgraded."),
            Some(69)
        );
        assert_eq!(newly_installed("Need to get 29.7 MB of archives."), None);
    }

    #[test]
    fn moves_forward_through_a_real_log() {
        let log = "I: automatically chosen mode: root\n\
            I: running apt-get update...\n\
            Get:1 http://deb.debian.org/debian bookworm InRelease [151 kB]\n\
            I: downloading packages with apt...\n\
            0 upgraded, 2 newly installed, 0 to remove and 0 not upgraded.\n\
            Get:1 http://deb.debian.org/debian bookworm/main amd64 bash\n\
            Get:2 http://deb.debian.org/debian bookworm/main amd64 dash\n\
            I: extracting archives...\n\
            I: installing essential packages...\n\
            Unpacking bash (5.2.15-2+b13) ...\n\
            Unpacking dash (0.5.12-2) ...\n\
            Setting up bash (5.2.15-2+b13) ...\n\
            Setting up dash (0.5.12-2) ...\n\
            I: installing remaining packages inside the chroot...\n\
            0 upgraded, 1 newly installed, 0 to remove and 0 not upgraded.\n\
            Get:1 http://deb.debian.org/debian bookworm/main amd64 git\n\
            Unpacking git (1:2.39.5-0+deb12u2) ...\n\
            Setting up git (1:2.39.5-0+deb12u2) ...\n\
            I: running --customize-hook in shell: sh -c 'useradd'\n\
            I: cleaning package lists and apt cache...\n\
            I: success in 34.1362 seconds";
        let mut t = Tracker::default();
        let positions: Vec<u64> = log
            .lines()
            .filter_map(|l| t.feed(l))
            .map(|u| u.position)
            .collect();
        assert!(positions.windows(2).all(|w| w[0] <= w[1]), "{positions:?}");
        // Halfway through the download phase after the first of two packages.
        assert!(positions.contains(&120), "{positions:?}");
        // Half of the essential phase after both packages are unpacked; done when set up.
        assert!(positions.contains(&410), "{positions:?}");
        assert!(positions.contains(&560), "{positions:?}");
        assert_eq!(positions.last(), Some(&TOTAL));
    }

    #[test]
    fn ignores_noise() {
        let mut t = Tracker::default();
        assert_eq!(t.feed("Reading package lists..."), None);
        assert_eq!(t.feed("Setting up bash"), None, "not in an install phase");
    }
}
