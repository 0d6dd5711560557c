//! The host side of `--net`: the taps a device needs, opened by name,
//! created, or adopted from descriptors, and configured as Cloud
//! Hypervisor configures them (address, netmask, MAC, MTU, link up).

use std::io;

use vmkit_config::NetConfig;

use super::tap::{self, Tap};

/// Why the taps could not be opened or configured; each names the option.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("fd={fds:?}: {count} descriptors for {pairs} queue pairs (num_queues={num_queues})")]
    FdCount {
        fds: Vec<i32>,
        count: usize,
        pairs: u16,
        num_queues: usize,
    },
    #[error("{count} tap queues handed over by the sending VMM for {pairs} queue pairs")]
    HandoverCount { count: usize, pairs: u16 },
    /// `what` names the option and the step that failed.
    #[error("{what}")]
    Tap {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// Turns an io::Error into a [`HostError::Tap`] saying `what` failed.
fn failed(what: String) -> impl FnOnce(io::Error) -> HostError {
    move |source| HostError::Tap { what, source }
}

/// The tap queues a migration's sender handed over, one per pair: already
/// configured on the host, so only adopted (each descriptor duplicated: the
/// originals stay with the VM for its resets).
pub fn adopt_taps(fds: &[std::fs::File], pairs: u16) -> Result<Vec<Tap>, HostError> {
    if fds.len() != usize::from(pairs) {
        return Err(HostError::HandoverCount {
            count: fds.len(),
            pairs,
        });
    }
    fds.iter()
        .map(|fd| {
            use std::os::fd::AsRawFd;
            Tap::from_fd(fd.as_raw_fd())
                .map_err(failed("a tap handed over by the sending VMM".to_owned()))
        })
        .collect()
}

/// The taps for `config`: one queue per pair, from `fds` or opened by name.
pub fn open_taps(config: &NetConfig, pairs: u16) -> Result<Vec<Tap>, HostError> {
    if let Some(fds) = config.fds.as_ref().filter(|f| !f.is_empty()) {
        if fds.len() != usize::from(pairs) {
            return Err(HostError::FdCount {
                fds: fds.clone(),
                count: fds.len(),
                pairs,
                num_queues: config.num_queues,
            });
        }
        let taps = fds
            .iter()
            .map(|&fd| Tap::from_fd(fd).map_err(failed(format!("fd={fd}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(mtu) = config.mtu {
            taps[0].set_mtu(mtu).map_err(failed(format!(
                "mtu={mtu}: cannot set the MTU of {}",
                taps[0].name()
            )))?;
        }
        return Ok(taps);
    }
    let (name, what) = match config.tap.as_deref() {
        Some(name) => (name, format!("tap={name}")),
        None => ("vmtap%d", "a new tap (vmtap%d)".to_owned()),
    };
    // A tap that existed keeps its addresses (Cloud Hypervisor's rule).
    let existed = config.tap.is_some() && tap::interface_exists(name);
    let multi_queue = pairs > 1;
    let first = Tap::open(name, multi_queue).map_err(failed(what.clone()))?;
    let ifname = first.name().to_owned();
    if !existed {
        first.set_ip(config.ip).map_err(failed(format!(
            "ip={}: cannot set the address of {ifname}",
            config.ip
        )))?;
        first.set_netmask(config.mask).map_err(failed(format!(
            "mask={}: cannot set the netmask of {ifname}",
            config.mask
        )))?;
    }
    if let Some(mac) = config.host_mac {
        first.set_mac(mac.0).map_err(failed(format!(
            "host_mac={mac}: cannot set the MAC of {ifname}"
        )))?;
    }
    if let Some(mtu) = config.mtu {
        first
            .set_mtu(mtu)
            .map_err(failed(format!("mtu={mtu}: cannot set the MTU of {ifname}")))?;
    }
    first
        .up()
        .map_err(failed(format!("{what}: cannot bring {ifname} up")))?;
    let mut taps = vec![first];
    for _ in 1..pairs {
        taps.push(
            Tap::open(&ifname, true)
                .map_err(failed(format!("{what}: another queue of {ifname}")))?,
        );
    }
    Ok(taps)
}
