//! Where this process's cgroups are: read from `/proc/self/cgroup` and
//! `/proc/self/mountinfo`, for the disk queues' CPU pressure (the cgroup v2
//! one) and for `cpu_groups` (the cpu controller's, v1 or v2). Pure text
//! handling: the callers read the files.

use std::path::PathBuf;

/// A cgroup hierarchy: the unified one (v2), or the v1 one that has a
/// controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hierarchy<'a> {
    Unified,
    V1(&'a str),
}

/// The directory of the cgroup that `cgroup` (a `/proc/<pid>/cgroup`) names
/// in `hierarchy`, where `mountinfo` mounts it (and the mount shows that
/// cgroup: a container's mount may show only a sub-tree). None when the
/// hierarchy is not mounted, does not show it, or the path is odd (a deleted
/// cgroup, `..`).
pub fn cgroup_dir(cgroup: &str, mountinfo: &str, hierarchy: Hierarchy<'_>) -> Option<PathBuf> {
    let own = cgroup.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (number, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let ours = match hierarchy {
            Hierarchy::Unified => number == "0" && controllers.is_empty(),
            Hierarchy::V1(wanted) => controllers.split(',').any(|c| c == wanted),
        };
        ours.then_some(path.trim_end())
    })?;
    if !own.starts_with('/') || own.ends_with(" (deleted)") {
        return None;
    }
    mountinfo.lines().find_map(|line| {
        let (mount, filesystem) = line.split_once(" - ")?;
        let mut filesystem = filesystem.split_whitespace();
        let fs_type = filesystem.next()?;
        let shows = match hierarchy {
            Hierarchy::Unified => fs_type == "cgroup2",
            Hierarchy::V1(wanted) => {
                // The controllers are among the super options (after the source).
                let options = filesystem.nth(1).unwrap_or("");
                fs_type == "cgroup" && options.split(',').any(|o| o == wanted)
            }
        };
        if !shows {
            return None;
        }
        let mut fields = mount.split_whitespace();
        let root = unescape(fields.nth(3)?);
        let point = unescape(fields.next()?);
        let below = if root == "/" {
            own
        } else {
            own.strip_prefix(root.as_str())
                .filter(|rest| rest.is_empty() || rest.starts_with('/'))?
        };
        let relative = below.trim_start_matches('/');
        if relative.split('/').any(|part| part == "..") {
            return None;
        }
        let mut dir = PathBuf::from(point);
        if !relative.is_empty() {
            dir.push(relative);
        }
        Some(dir)
    })
}

/// The cgroup that holds this process's CPU share, as (version, directory):
/// the v1 cpu controller's where it is mounted (it then owns the cpu
/// controller, whatever the unified hierarchy shows), else the unified one.
pub fn cpu_cgroup_dir(cgroup: &str, mountinfo: &str) -> Option<(u8, PathBuf)> {
    cgroup_dir(cgroup, mountinfo, Hierarchy::V1("cpu"))
        .map(|dir| (1, dir))
        .or_else(|| cgroup_dir(cgroup, mountinfo, Hierarchy::Unified).map(|dir| (2, dir)))
}

/// A mountinfo field with its octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |value, d| value * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
31 22 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// cgroup v1 with the cpu controller beside an empty unified hierarchy.
    const V1_MOUNTS: &str = "\
30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
31 25 0:27 / /sys/fs/cgroup/cpuacct rw,relatime shared:10 - cgroup cgroup rw,cpuacct
40 25 0:35 / /sys/fs/cgroup/unified rw,relatime shared:20 - cgroup2 cgroup2 rw
";

    fn unified(cgroup: &str, mountinfo: &str) -> Option<PathBuf> {
        cgroup_dir(cgroup, mountinfo, Hierarchy::Unified)
    }

    #[test]
    fn the_own_cgroup_v2_is_found_under_the_cgroup2_mount() {
        let cgroup = "1:cpu:/\n0::/system.slice/vm 1.service\n";
        assert_eq!(
            unified(cgroup, MOUNTINFO),
            Some(PathBuf::from(
                "/sys/fs/cgroup/unified/system.slice/vm 1.service"
            ))
        );
        assert_eq!(
            unified("0::/\n", MOUNTINFO),
            Some(PathBuf::from("/sys/fs/cgroup/unified")),
            "the root cgroup"
        );
    }

    #[test]
    fn a_mount_of_a_sub_tree_and_escaped_paths_resolve() {
        // A container's view: the mount shows /kubepods/pod1 at /sys/fs/cgroup.
        let mountinfo = "50 40 0:38 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            unified("0::/kubepods/pod1/ctr\n", mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/ctr"))
        );
        assert_eq!(
            unified("0::/kubepods/pod10\n", mountinfo),
            None,
            "a sibling whose name starts alike is not below the mount"
        );
        let mountinfo = "50 40 0:38 / /mnt/cgroup\\040v2 rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            unified("0::/a\n", mountinfo),
            Some(PathBuf::from("/mnt/cgroup v2/a"))
        );
    }

    #[test]
    fn no_hierarchy_or_a_strange_cgroup_gives_none() {
        let no_cgroups = "22 1 8:1 / / rw - ext4 /dev/vda rw\n";
        assert_eq!(unified("0::/\n", no_cgroups), None);
        assert_eq!(unified("1:cpu:/x\n", MOUNTINFO), None, "no 0:: line");
        assert_eq!(unified("0::/gone (deleted)\n", MOUNTINFO), None);
        assert_eq!(unified("0::/a/../../etc\n", MOUNTINFO), None);
        assert_eq!(cpu_cgroup_dir("0::/\n", no_cgroups), None);
        assert_eq!(
            cpu_cgroup_dir("1:cpu:/\n", "40 25 0:35 / /x rw - tmpfs tmpfs rw\n"),
            None
        );
    }

    #[test]
    fn the_v1_cpu_hierarchy_wins_over_the_unified_one() {
        assert_eq!(
            cpu_cgroup_dir("2:cpuacct:/a\n1:cpu:/ci/job7\n0::/\n", V1_MOUNTS),
            Some((1, PathBuf::from("/sys/fs/cgroup/cpu/ci/job7")))
        );
        assert_eq!(
            cpu_cgroup_dir("0::/ci/job7\n", MOUNTINFO),
            Some((2, PathBuf::from("/sys/fs/cgroup/unified/ci/job7"))),
            "no cpu controller in v1: the unified hierarchy's"
        );
    }

    #[test]
    fn v1_controllers_are_matched_whole_and_co_mounted() {
        let comounted =
            "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        assert_eq!(
            cpu_cgroup_dir("3:cpu,cpuacct:/x\n", comounted),
            Some((1, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/x")))
        );
        // "cpuacct" or "cpuset" is not "cpu".
        let cpuacct_only = "31 25 0:27 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n";
        assert_eq!(cpu_cgroup_dir("2:cpuacct:/a\n", cpuacct_only), None);
        // A container that sees its own cgroup as the mount's root.
        let container = "30 25 0:26 /docker/abc /sys/fs/cgroup/cpu ro - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cpu_cgroup_dir("1:cpu:/docker/abc/inner\n", container),
            Some((1, PathBuf::from("/sys/fs/cgroup/cpu/inner")))
        );
    }
}
