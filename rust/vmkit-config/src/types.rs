//! Config structs in Cloud Hypervisor v37's JSON shape: field names, field
//! order (serialisation order), defaults and required fields all follow v37.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::values::MacAddr;

pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;
pub const DEFAULT_RNG_SOURCE: &str = "/dev/urandom";
pub const DEFAULT_MAX_PHYS_BITS: u8 = 46;
pub const DEFAULT_NUM_PCI_SEGMENTS: u16 = 1;
pub const MAX_NUM_PCI_SEGMENTS: u16 = 96;
pub const DEFAULT_DISK_NUM_QUEUES: usize = 1;
pub const DEFAULT_DISK_QUEUE_SIZE: u16 = 128;
pub const DEFAULT_NET_NUM_QUEUES: usize = 2;
pub const DEFAULT_NET_QUEUE_SIZE: u16 = 256;
pub const DEFAULT_FS_NUM_QUEUES: usize = 1;
pub const DEFAULT_FS_QUEUE_SIZE: u16 = 1024;
pub const DEFAULT_VDPA_NUM_QUEUES: usize = 1;
pub const DEFAULT_NET_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 249, 1);
pub const DEFAULT_NET_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
pub const MIN_MTU: u16 = 1280;

fn default_true() -> bool {
    true
}
fn default_max_phys_bits() -> u8 {
    DEFAULT_MAX_PHYS_BITS
}
fn default_num_pci_segments() -> u16 {
    DEFAULT_NUM_PCI_SEGMENTS
}
fn default_disk_num_queues() -> usize {
    DEFAULT_DISK_NUM_QUEUES
}
fn default_disk_queue_size() -> u16 {
    DEFAULT_DISK_QUEUE_SIZE
}
fn default_net_num_queues() -> usize {
    DEFAULT_NET_NUM_QUEUES
}
fn default_net_queue_size() -> u16 {
    DEFAULT_NET_QUEUE_SIZE
}
fn default_fs_num_queues() -> usize {
    DEFAULT_FS_NUM_QUEUES
}
fn default_fs_queue_size() -> u16 {
    DEFAULT_FS_QUEUE_SIZE
}
fn default_vdpa_num_queues() -> usize {
    DEFAULT_VDPA_NUM_QUEUES
}
fn default_net_ip() -> Ipv4Addr {
    DEFAULT_NET_IP
}
fn default_net_mask() -> Ipv4Addr {
    DEFAULT_NET_MASK
}
fn default_serial() -> ConsoleConfig {
    ConsoleConfig::with_mode(ConsoleOutputMode::Null)
}
fn default_console() -> ConsoleConfig {
    ConsoleConfig::with_mode(ConsoleOutputMode::Tty)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuAffinity {
    pub vcpu: u8,
    pub host_cpus: Vec<usize>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    #[serde(default)]
    pub amx: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTopology {
    pub threads_per_core: u8,
    pub cores_per_die: u8,
    pub dies_per_package: u8,
    pub packages: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
    #[serde(default)]
    pub topology: Option<CpuTopology>,
    #[serde(default)]
    pub kvm_hyperv: bool,
    #[serde(default = "default_max_phys_bits")]
    pub max_phys_bits: u8,
    #[serde(default)]
    pub affinity: Option<Vec<CpuAffinity>>,
    #[serde(default)]
    pub features: CpuFeatures,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: DEFAULT_VCPUS,
            max_vcpus: DEFAULT_VCPUS,
            topology: None,
            kvm_hyperv: false,
            max_phys_bits: DEFAULT_MAX_PHYS_BITS,
            affinity: None,
            features: CpuFeatures::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformConfig {
    #[serde(default = "default_num_pci_segments")]
    pub num_pci_segments: u16,
    #[serde(default)]
    pub iommu_segments: Option<Vec<u16>>,
    #[serde(default)]
    pub serial_number: Option<String>,
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub oem_strings: Option<Vec<String>>,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            num_pci_segments: DEFAULT_NUM_PCI_SEGMENTS,
            iommu_segments: None,
            serial_number: None,
            uuid: None,
            oem_strings: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HotplugMethod {
    #[default]
    Acpi,
    VirtioMem,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryZoneConfig {
    pub id: String,
    pub size: u64,
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default)]
    pub hugepage_size: Option<u64>,
    #[serde(default)]
    pub host_numa_node: Option<u32>,
    #[serde(default)]
    pub hotplug_size: Option<u64>,
    #[serde(default)]
    pub hotplugged_size: Option<u64>,
    #[serde(default)]
    pub prefault: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    pub size: u64,
    #[serde(default)]
    pub mergeable: bool,
    #[serde(default)]
    pub hotplug_method: HotplugMethod,
    #[serde(default)]
    pub hotplug_size: Option<u64>,
    #[serde(default)]
    pub hotplugged_size: Option<u64>,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default)]
    pub hugepage_size: Option<u64>,
    #[serde(default)]
    pub prefault: bool,
    #[serde(default)]
    pub zones: Option<Vec<MemoryZoneConfig>>,
    #[serde(default = "default_true")]
    pub thp: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY_SIZE,
            mergeable: false,
            hotplug_method: HotplugMethod::Acpi,
            hotplug_size: None,
            hotplugged_size: None,
            shared: false,
            hugepages: false,
            hugepage_size: None,
            prefault: false,
            zones: None,
            thp: true,
        }
    }
}

impl MemoryConfig {
    /// size + hotplugged_size + Σ zones (size + hotplugged_size), saturating.
    pub fn total_size(&self) -> u64 {
        let zones = self.zones.iter().flatten().fold(0u64, |acc, zone| {
            acc.saturating_add(zone.size)
                .saturating_add(zone.hotplugged_size.unwrap_or(0))
        });
        self.size
            .saturating_add(self.hotplugged_size.unwrap_or(0))
            .saturating_add(zones)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterGroupConfig {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub rate_limiter_config: RateLimiterConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default = "default_disk_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_disk_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub vhost_user: bool,
    #[serde(default)]
    pub vhost_socket: Option<String>,
    #[serde(default)]
    pub rate_limit_group: Option<String>,
    #[serde(default)]
    pub rate_limiter_config: Option<RateLimiterConfig>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub disable_io_uring: bool,
    #[serde(default)]
    pub disable_aio: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub serial: Option<String>,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            path: None,
            readonly: false,
            direct: false,
            iommu: false,
            num_queues: DEFAULT_DISK_NUM_QUEUES,
            queue_size: DEFAULT_DISK_QUEUE_SIZE,
            vhost_user: false,
            vhost_socket: None,
            rate_limit_group: None,
            rate_limiter_config: None,
            id: None,
            disable_io_uring: false,
            disable_aio: false,
            pci_segment: 0,
            serial: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VhostMode {
    #[default]
    Client,
    Server,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    #[serde(default)]
    pub tap: Option<String>,
    #[serde(default = "default_net_ip")]
    pub ip: Ipv4Addr,
    #[serde(default = "default_net_mask")]
    pub mask: Ipv4Addr,
    #[serde(default = "MacAddr::random")]
    pub mac: MacAddr,
    #[serde(default)]
    pub host_mac: Option<MacAddr>,
    #[serde(default)]
    pub mtu: Option<u16>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default = "default_net_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_net_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub vhost_user: bool,
    #[serde(default)]
    pub vhost_socket: Option<String>,
    #[serde(default)]
    pub vhost_mode: VhostMode,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub fds: Option<Vec<i32>>,
    #[serde(default)]
    pub rate_limiter_config: Option<RateLimiterConfig>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default = "default_true")]
    pub offload_tso: bool,
    #[serde(default = "default_true")]
    pub offload_ufo: bool,
    #[serde(default = "default_true")]
    pub offload_csum: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    pub src: String,
    #[serde(default)]
    pub iommu: bool,
}

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig {
            src: DEFAULT_RNG_SOURCE.to_owned(),
            iommu: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    pub size: u64,
    #[serde(default)]
    pub deflate_on_oom: bool,
    #[serde(default)]
    pub free_page_reporting: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    pub tag: String,
    pub socket: String,
    #[serde(default = "default_fs_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmemConfig {
    pub file: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub discard_writes: bool,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleOutputMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    #[serde(default)]
    pub file: Option<String>,
    pub mode: ConsoleOutputMode,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub socket: Option<String>,
}

impl ConsoleConfig {
    pub fn with_mode(mode: ConsoleOutputMode) -> Self {
        ConsoleConfig {
            file: None,
            mode,
            iommu: false,
            socket: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    pub path: String,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDeviceConfig {
    pub socket: String,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdpaConfig {
    pub path: String,
    #[serde(default = "default_vdpa_num_queues")]
    pub num_queues: usize,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u32,
    pub socket: String,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SgxEpcConfig {
    pub id: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub prefault: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaDistance {
    #[serde(default)]
    pub destination: u32,
    #[serde(default)]
    pub distance: u8,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaConfig {
    #[serde(default)]
    pub guest_numa_id: u32,
    #[serde(default)]
    pub cpus: Option<Vec<u8>>,
    #[serde(default)]
    pub distances: Option<Vec<NumaDistance>>,
    #[serde(default)]
    pub memory_zones: Option<Vec<String>>,
    #[serde(default)]
    pub sgx_epc_sections: Option<Vec<String>>,
    #[serde(default)]
    pub pci_segments: Option<Vec<u16>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    #[serde(default)]
    pub firmware: Option<String>,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub initramfs: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmConfig {
    pub socket: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreConfig {
    pub source_url: String,
    #[serde(default)]
    pub prefault: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub payload: Option<PayloadConfig>,
    #[serde(default)]
    pub rate_limit_groups: Option<Vec<RateLimiterGroupConfig>>,
    #[serde(default)]
    pub disks: Option<Vec<DiskConfig>>,
    #[serde(default)]
    pub net: Option<Vec<NetConfig>>,
    #[serde(default)]
    pub rng: RngConfig,
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    #[serde(default)]
    pub fs: Option<Vec<FsConfig>>,
    #[serde(default)]
    pub pmem: Option<Vec<PmemConfig>>,
    #[serde(default = "default_serial")]
    pub serial: ConsoleConfig,
    #[serde(default = "default_console")]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub devices: Option<Vec<DeviceConfig>>,
    #[serde(default)]
    pub user_devices: Option<Vec<UserDeviceConfig>>,
    #[serde(default)]
    pub vdpa: Option<Vec<VdpaConfig>>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub pvpanic: bool,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub sgx_epc: Option<Vec<SgxEpcConfig>>,
    #[serde(default)]
    pub numa: Option<Vec<NumaConfig>>,
    #[serde(default)]
    pub watchdog: bool,
    #[serde(default)]
    pub platform: Option<PlatformConfig>,
    #[serde(default)]
    pub tpm: Option<TpmConfig>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            payload: None,
            rate_limit_groups: None,
            disks: None,
            net: None,
            rng: RngConfig::default(),
            balloon: None,
            fs: None,
            pmem: None,
            serial: default_serial(),
            console: default_console(),
            devices: None,
            user_devices: None,
            vdpa: None,
            vsock: None,
            pvpanic: false,
            iommu: false,
            sgx_epc: None,
            numa: None,
            watchdog: false,
            platform: None,
            tpm: None,
        }
    }
}
