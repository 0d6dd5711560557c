//! Whole-config validation, rule by rule in v37's order.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::error::ValidationError;
use crate::types::*;

type Result<T> = std::result::Result<T, ValidationError>;

fn check_identifier(ids: &mut BTreeSet<String>, id: &Option<String>) -> Result<()> {
    if let Some(id) = id {
        check_identifier_str(ids, id)?;
    }
    Ok(())
}

fn check_identifier_str(ids: &mut BTreeSet<String>, id: &str) -> Result<()> {
    if id.starts_with("__") {
        return Err(ValidationError::InvalidIdentifier(id.to_owned()));
    }
    if !ids.insert(id.to_owned()) {
        return Err(ValidationError::IdentifierNotUnique(id.to_owned()));
    }
    Ok(())
}

impl VmConfig {
    /// Memory is shared-memory backed (needed by vhost-user and user devices).
    pub fn backed_by_shared_memory(&self) -> bool {
        if self.memory.shared || self.memory.hugepages {
            return true;
        }
        if self.memory.size == 0 {
            if let Some(zones) = &self.memory.zones {
                return zones.iter().all(|z| z.shared || z.hugepages);
            }
        }
        false
    }

    /// Segment checks for a device that can sit behind an IOMMU.
    fn check_segment(&self, segment: u16, iommu: bool) -> Result<()> {
        if let Some(platform) = &self.platform {
            if segment >= platform.num_pci_segments {
                return Err(ValidationError::InvalidPciSegment(segment));
            }
            if let Some(iommu_segments) = &platform.iommu_segments {
                if iommu_segments.contains(&segment) && !iommu {
                    return Err(ValidationError::OnIommuSegment(segment));
                }
            }
        }
        Ok(())
    }

    /// Segment checks for fs and user devices, which cannot sit behind an IOMMU.
    fn check_segment_no_iommu(&self, segment: u16) -> Result<()> {
        if let Some(platform) = &self.platform {
            if segment >= platform.num_pci_segments {
                return Err(ValidationError::InvalidPciSegment(segment));
            }
            if let Some(iommu_segments) = &platform.iommu_segments {
                if iommu_segments.contains(&segment) {
                    return Err(ValidationError::IommuNotSupportedOnSegment(segment));
                }
            }
        }
        Ok(())
    }

    /// Validates in v37's order, sets the top-level `iommu` as v37 does, and
    /// returns every user-given identifier.
    pub fn validate(&mut self) -> Result<BTreeSet<String>> {
        let mut ids = BTreeSet::new();

        if self.payload.is_none() {
            return Err(ValidationError::KernelMissing);
        }
        for console in [&self.console, &self.serial] {
            if console.mode == ConsoleOutputMode::File && console.file.is_none() {
                return Err(ValidationError::ConsoleFileMissing);
            }
        }
        if self.cpus.max_vcpus < self.cpus.boot_vcpus {
            return Err(ValidationError::CpusMaxLowerThanBoot);
        }
        let boot_vcpus = usize::from(self.cpus.boot_vcpus);

        for group in self.rate_limit_groups.iter().flatten() {
            let rl = &group.rate_limiter_config;
            if (rl.bandwidth.is_none() && rl.ops.is_none()) || group.id.is_empty() {
                return Err(ValidationError::InvalidRateLimiterGroup);
            }
            check_identifier_str(&mut ids, &group.id)?;
        }

        for disk in self.disks.iter().flatten() {
            if disk.vhost_socket.is_some() && disk.path.is_some() {
                return Err(ValidationError::DiskSocketAndPath);
            }
            if disk.vhost_user && !self.backed_by_shared_memory() {
                return Err(ValidationError::VhostUserRequiresSharedMemory);
            }
            if disk.vhost_user && disk.vhost_socket.is_none() {
                return Err(ValidationError::VhostUserMissingSocket);
            }
            if let Some(group) = &disk.rate_limit_group {
                let known = self
                    .rate_limit_groups
                    .iter()
                    .flatten()
                    .any(|g| &g.id == group);
                if !known {
                    return Err(ValidationError::InvalidRateLimiterGroup);
                }
            }
            if disk.num_queues > boot_vcpus {
                return Err(ValidationError::TooManyQueues);
            }
            if disk.vhost_user && disk.iommu {
                return Err(ValidationError::IommuNotSupported);
            }
            self.check_segment(disk.pci_segment, disk.iommu)?;
            if disk.rate_limit_group.is_some() && disk.rate_limiter_config.is_some() {
                return Err(ValidationError::InvalidRateLimiterGroup);
            }
            check_identifier(&mut ids, &disk.id)?;
        }

        for net in self.net.iter().flatten() {
            if net.vhost_user && !self.backed_by_shared_memory() {
                return Err(ValidationError::VhostUserRequiresSharedMemory);
            }
            if net.num_queues < 2 {
                return Err(ValidationError::VnetQueueLowerThan2);
            }
            if let Some(fds) = &net.fds {
                if fds.len().saturating_mul(2) != net.num_queues {
                    return Err(ValidationError::VnetQueueFdMismatch);
                }
                if fds.iter().any(|&fd| fd <= 2) {
                    return Err(ValidationError::VnetReservedFd);
                }
            }
            if net.num_queues / 2 > boot_vcpus {
                return Err(ValidationError::TooManyQueues);
            }
            if net.vhost_user && net.iommu {
                return Err(ValidationError::IommuNotSupported);
            }
            self.check_segment(net.pci_segment, net.iommu)?;
            if let Some(mtu) = net.mtu {
                if mtu < MIN_MTU {
                    return Err(ValidationError::InvalidMtu(mtu));
                }
            }
            if !net.offload_csum && (net.offload_tso || net.offload_ufo) {
                return Err(ValidationError::NoHardwareChecksumOffload);
            }
            check_identifier(&mut ids, &net.id)?;
        }

        if let Some(fs_list) = &self.fs {
            if !fs_list.is_empty() && !self.backed_by_shared_memory() {
                return Err(ValidationError::VhostUserRequiresSharedMemory);
            }
            for fs in fs_list {
                if fs.num_queues > boot_vcpus {
                    return Err(ValidationError::TooManyQueues);
                }
                self.check_segment_no_iommu(fs.pci_segment)?;
                check_identifier(&mut ids, &fs.id)?;
            }
        }

        for pmem in self.pmem.iter().flatten() {
            self.check_segment(pmem.pci_segment, pmem.iommu)?;
            check_identifier(&mut ids, &pmem.id)?;
        }

        if let Some(t) = &self.cpus.topology {
            let parts = [
                t.threads_per_core,
                t.cores_per_die,
                t.dies_per_package,
                t.packages,
            ];
            if parts.contains(&0) {
                return Err(ValidationError::CpuTopologyZeroPart);
            }
            let product: u32 = parts.iter().map(|&p| u32::from(p)).product();
            if product != u32::from(self.cpus.max_vcpus) {
                return Err(ValidationError::CpuTopologyCount);
            }
        }

        if let Some(size) = self.memory.hugepage_size {
            if !self.memory.hugepages {
                return Err(ValidationError::HugePageSizeWithoutHugePages);
            }
            if !size.is_power_of_two() {
                return Err(ValidationError::InvalidHugePageSize(size));
            }
        }

        if let Some(user_devices) = &self.user_devices {
            if !user_devices.is_empty() && !self.backed_by_shared_memory() {
                return Err(ValidationError::UserDevicesRequireSharedMemory);
            }
            for device in user_devices {
                self.check_segment_no_iommu(device.pci_segment)?;
                check_identifier(&mut ids, &device.id)?;
            }
        }

        for vdpa in self.vdpa.iter().flatten() {
            self.check_segment(vdpa.pci_segment, vdpa.iommu)?;
            check_identifier(&mut ids, &vdpa.id)?;
        }

        if let Some(vsock) = &self.vsock {
            if matches!(vsock.cid, 0 | 1 | 2 | u32::MAX) {
                return Err(ValidationError::VsockSpecialCid(vsock.cid));
            }
        }

        if let Some(balloon) = &self.balloon {
            let ram = self
                .memory
                .zones
                .iter()
                .flatten()
                .fold(self.memory.size, |acc, z| acc.saturating_add(z.size));
            if balloon.size >= ram {
                return Err(ValidationError::BalloonLargerThanRam(balloon.size, ram));
            }
        }

        if let Some(devices) = &self.devices {
            let mut paths = HashSet::new();
            for device in devices {
                if !paths.insert(device.path.as_str()) {
                    return Err(ValidationError::DuplicateDevicePath(device.path.clone()));
                }
                self.check_segment(device.pci_segment, device.iommu)?;
                check_identifier(&mut ids, &device.id)?;
            }
        }

        if let Some(vsock) = &self.vsock {
            self.check_segment(vsock.pci_segment, vsock.iommu)?;
            check_identifier(&mut ids, &vsock.id)?;
        }

        if let Some(nodes) = &self.numa {
            let num_segments = self
                .platform
                .as_ref()
                .map_or(DEFAULT_NUM_PCI_SEGMENTS, |p| p.num_pci_segments);
            let mut zone_owner: HashMap<&str, u32> = HashMap::new();
            let mut segment_owner: HashMap<u16, u32> = HashMap::new();
            for node in nodes {
                let this = node.guest_numa_id;
                for zone in node.memory_zones.iter().flatten() {
                    if let Some(&earlier) = zone_owner.get(zone.as_str()) {
                        return Err(ValidationError::MemoryZoneReused(
                            zone.clone(),
                            earlier,
                            this,
                        ));
                    }
                    zone_owner.insert(zone, this);
                }
                for &segment in node.pci_segments.iter().flatten() {
                    if segment >= num_segments {
                        return Err(ValidationError::InvalidPciSegment(segment));
                    }
                    if segment == 0 && this != 0 {
                        return Err(ValidationError::DefaultPciSegmentInvalidNode(this));
                    }
                    if let Some(&earlier) = segment_owner.get(&segment) {
                        return Err(ValidationError::PciSegmentReused(segment, earlier, this));
                    }
                    segment_owner.insert(segment, this);
                }
            }
        }

        for zone in self.memory.zones.iter().flatten() {
            check_identifier_str(&mut ids, &zone.id)?;
        }
        for epc in self.sgx_epc.iter().flatten() {
            check_identifier_str(&mut ids, &epc.id)?;
        }

        if let Some(platform) = &self.platform {
            if platform.num_pci_segments == 0 || platform.num_pci_segments > MAX_NUM_PCI_SEGMENTS {
                return Err(ValidationError::InvalidNumPciSegments(
                    platform.num_pci_segments,
                ));
            }
            for &segment in platform.iommu_segments.iter().flatten() {
                if segment >= platform.num_pci_segments {
                    return Err(ValidationError::InvalidPciSegment(segment));
                }
            }
        }

        self.iommu |= self.any_device_behind_iommu();
        Ok(ids)
    }

    fn any_device_behind_iommu(&self) -> bool {
        self.disks.iter().flatten().any(|d| d.iommu)
            || self.net.iter().flatten().any(|n| n.iommu)
            || self.pmem.iter().flatten().any(|p| p.iommu)
            || self.vdpa.iter().flatten().any(|v| v.iommu)
            || self.devices.iter().flatten().any(|d| d.iommu)
            || self.vsock.as_ref().is_some_and(|v| v.iommu)
            || self.rng.iommu
            || self.console.iommu
            || self
                .platform
                .as_ref()
                .is_some_and(|p| p.iommu_segments.is_some())
    }
}
