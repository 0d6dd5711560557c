//! The host side of `--net`: the taps a device needs, opened by name,
//! created, or adopted from descriptors, and configured as Cloud
//! Hypervisor configures them (address, netmask, MAC, MTU, link up).

use vmkit_config::NetConfig;

use super::tap::{self, Tap};

/// The taps for `config`: one queue per pair, from `fds` or opened by name.
pub fn open_taps(config: &NetConfig, pairs: u16) -> std::result::Result<Vec<Tap>, String> {
    if let Some(fds) = config.fds.as_ref().filter(|f| !f.is_empty()) {
        if fds.len() != usize::from(pairs) {
            return Err(format!(
                "fd={fds:?}: {} descriptors for {pairs} queue pairs (num_queues={})",
                fds.len(),
                config.num_queues
            ));
        }
        let taps = fds
            .iter()
            .map(|&fd| Tap::from_fd(fd).map_err(|e| format!("fd={fd}: {e}")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if let Some(mtu) = config.mtu {
            taps[0]
                .set_mtu(mtu)
                .map_err(|e| format!("mtu={mtu}: cannot set the MTU of {}: {e}", taps[0].name()))?;
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
    let first = Tap::open(name, multi_queue).map_err(|e| format!("{what}: {e}"))?;
    let ifname = first.name().to_owned();
    if !existed {
        first
            .set_ip(config.ip)
            .map_err(|e| format!("ip={}: cannot set the address of {ifname}: {e}", config.ip))?;
        first.set_netmask(config.mask).map_err(|e| {
            format!(
                "mask={}: cannot set the netmask of {ifname}: {e}",
                config.mask
            )
        })?;
    }
    if let Some(mac) = config.host_mac {
        first
            .set_mac(mac.0)
            .map_err(|e| format!("host_mac={mac}: cannot set the MAC of {ifname}: {e}"))?;
    }
    if let Some(mtu) = config.mtu {
        first
            .set_mtu(mtu)
            .map_err(|e| format!("mtu={mtu}: cannot set the MTU of {ifname}: {e}"))?;
    }
    first
        .up()
        .map_err(|e| format!("{what}: cannot bring {ifname} up: {e}"))?;
    let mut taps = vec![first];
    for _ in 1..pairs {
        taps.push(
            Tap::open(&ifname, true)
                .map_err(|e| format!("{what}: another queue of {ifname}: {e}"))?,
        );
    }
    Ok(taps)
}
