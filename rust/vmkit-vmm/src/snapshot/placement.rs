//! Where each PCI function of a saved VM sits, and the PCI hot-plug state:
//! what lets a restore (or a migration's receiver) build every device in the
//! slot and address ranges it had, whatever order the config lists them in
//! after hot-plugs and removals (Cloud Hypervisor keeps the same in its
//! device tree: each node's BDF and resources).

use std::collections::HashSet;

use super::codec::{Reader, Writer};
use super::SnapshotError;
use crate::pci::DEVICES_PER_BUS;

/// One PCI function: its id, (segment, slot) (function 0), the start of
/// BAR 0 as allocated from its segment's window, and a pmem device's region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciPlace {
    pub id: String,
    pub segment: u16,
    pub slot: u8,
    pub bar: u64,
    /// A pmem device's memory region start (from the segment's 64-bit window).
    pub region: Option<u64>,
}

/// The PCI functions' places and what the guest has not read yet from the
/// PCI hot-plug controller and the GED.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PciPlacement {
    /// Cloud Hypervisor's automatic device id counter (`_disk<N>`, ...).
    pub device_id_counter: u64,
    /// GED events raised and not read yet.
    pub ged_pending: u8,
    /// The segment PSEG selects.
    pub selected_segment: u32,
    /// Each segment's (PCIU, PCID) slot bitmaps not read yet.
    pub hotplug_bits: Vec<(u32, u32)>,
    pub functions: Vec<PciPlace>,
}

/// v37 allows 96 segments; anything far past that is not a VM's.
const MAX_SEGMENTS: usize = 256;
const MAX_ID: usize = 256;
/// The GED event bits Cloud Hypervisor defines (CPU, memory, PCI, power button).
const GED_EVENTS: u32 = 0xf;

impl PciPlacement {
    pub fn encode(&self, w: &mut Writer) {
        w.u64(self.device_id_counter);
        w.u32(u32::from(self.ged_pending));
        w.u32(self.selected_segment);
        w.u32(self.hotplug_bits.len() as u32);
        for &(up, down) in &self.hotplug_bits {
            w.u32(up);
            w.u32(down);
        }
        w.u32(self.functions.len() as u32);
        for place in &self.functions {
            w.blob(place.id.as_bytes());
            w.u32(u32::from(place.segment));
            w.u32(u32::from(place.slot));
            w.u64(place.bar);
            w.u64(place.region.unwrap_or(0));
        }
    }

    /// Reads what `encode` wrote and checks it on its own: known GED bits,
    /// a selected segment that exists, ids once each, slots 1 to 31 of
    /// existing segments, one function per slot. Whether the places fit the
    /// config and the windows is for the device manager to check.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, SnapshotError> {
        let device_id_counter = r.u64()?;
        let ged = r.u32()?;
        if ged & !GED_EVENTS != 0 {
            return Err(r.corrupt(format!("GED events {ged:#x}")));
        }
        let selected_segment = r.u32()?;
        let segments = r.u32()? as usize;
        if segments == 0 || segments > MAX_SEGMENTS {
            return Err(r.corrupt(format!("{segments} PCI segments")));
        }
        if selected_segment as usize >= segments {
            return Err(r.corrupt(format!(
                "PSEG selects segment {selected_segment} of {segments}"
            )));
        }
        let mut hotplug_bits = Vec::with_capacity(segments);
        for _ in 0..segments {
            hotplug_bits.push((r.u32()?, r.u32()?));
        }
        let count = r.u32()? as usize;
        if count > segments * (DEVICES_PER_BUS - 1) {
            return Err(r.corrupt(format!("{count} PCI functions on {segments} segments")));
        }
        let mut functions = Vec::with_capacity(count);
        let mut ids = HashSet::new();
        let mut slots = HashSet::new();
        for _ in 0..count {
            let id = std::str::from_utf8(r.blob(MAX_ID)?)
                .ok()
                .filter(|id| !id.is_empty())
                .ok_or_else(|| r.corrupt("a PCI function id that is not UTF-8 text".to_owned()))?
                .to_owned();
            let segment = r.u32()?;
            let slot = r.u32()?;
            let bar = r.u64()?;
            let region = r.u64()?;
            if segment as usize >= segments {
                return Err(r.corrupt(format!(
                    "{id} on PCI segment {segment}, the VM has {segments}"
                )));
            }
            if slot == 0 || slot as usize >= DEVICES_PER_BUS {
                return Err(r.corrupt(format!(
                    "{id} in slot {slot} (slots 1 to {} hold devices)",
                    DEVICES_PER_BUS - 1
                )));
            }
            if !slots.insert((segment, slot)) {
                return Err(r.corrupt(format!(
                    "{id} in slot {segment:04x}:00:{slot:02x}, which another device has"
                )));
            }
            if !ids.insert(id.clone()) {
                return Err(r.corrupt(format!("PCI function {id} twice")));
            }
            functions.push(PciPlace {
                id,
                segment: segment as u16,
                slot: slot as u8,
                bar,
                region: (region != 0).then_some(region),
            });
        }
        Ok(PciPlacement {
            device_id_counter,
            ged_pending: ged as u8,
            selected_segment,
            hotplug_bits,
            functions,
        })
    }

    /// The place recorded for device `id`.
    pub fn find(&self, id: &str) -> Option<&PciPlace> {
        self.functions.iter().find(|p| p.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement() -> PciPlacement {
        PciPlacement {
            device_id_counter: 3,
            ged_pending: 4,
            selected_segment: 1,
            hotplug_bits: vec![(1 << 2, 0), (0, 1 << 3)],
            functions: vec![
                PciPlace {
                    id: "__rng".to_owned(),
                    segment: 0,
                    slot: 1,
                    bar: 0xdff8_0000,
                    region: None,
                },
                PciPlace {
                    id: "_pmem2".to_owned(),
                    segment: 1,
                    slot: 3,
                    bar: 0x1_0000_0000,
                    region: Some(0x2_0000_0000),
                },
            ],
        }
    }

    fn round_trip(p: &PciPlacement) -> Result<PciPlacement, SnapshotError> {
        let mut w = Writer::default();
        p.encode(&mut w);
        let mut r = Reader::new("placement", &w.bytes);
        let decoded = PciPlacement::decode(&mut r)?;
        r.finish()?;
        Ok(decoded)
    }

    #[test]
    fn a_placement_round_trips() {
        let p = placement();
        assert_eq!(round_trip(&p).unwrap(), p);
        assert_eq!(p.find("_pmem2").map(|f| f.slot), Some(3));
        assert!(p.find("_disk0").is_none());
    }

    #[test]
    fn hostile_placements_are_refused_by_name() {
        type Edit = fn(&mut PciPlacement);
        let cases: [(&str, Edit); 8] = [
            ("two devices in one slot", |p| {
                p.functions[1] = PciPlace {
                    id: "x".to_owned(),
                    ..p.functions[0].clone()
                }
            }),
            ("one id twice", |p| {
                p.functions[1].id = "__rng".to_owned();
            }),
            ("slot 0", |p| p.functions[0].slot = 0),
            ("slot 32", |p| p.functions[0].slot = 32),
            ("a segment the VM lacks", |p| p.functions[0].segment = 2),
            ("a PSEG past the segments", |p| p.selected_segment = 2),
            ("an unknown GED event", |p| p.ged_pending = 0x80),
            ("no segment", |p| {
                p.hotplug_bits.clear();
                p.selected_segment = 0;
                p.functions.clear();
            }),
        ];
        let expected = [
            "x in slot 0000:00:01, which another device has",
            "PCI function __rng twice",
            "__rng in slot 0 (slots 1 to 31 hold devices)",
            "__rng in slot 32",
            "__rng on PCI segment 2, the VM has 2",
            "PSEG selects segment 2 of 2",
            "GED events 0x80",
            "0 PCI segments",
        ];
        for ((what, edit), message) in cases.into_iter().zip(expected) {
            let mut p = placement();
            edit(&mut p);
            let err = round_trip(&p).expect_err(what).to_string();
            assert!(err.contains(message), "{what}: {err}");
        }
        // An id that is not text, and a truncated record.
        let mut w = Writer::default();
        placement().encode(&mut w);
        let at = w.bytes.windows(5).position(|b| b == b"__rng").unwrap();
        let mut bytes = w.bytes.clone();
        bytes[at] = 0xff;
        let err = PciPlacement::decode(&mut Reader::new("placement", &bytes)).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
        let short = &w.bytes[..w.bytes.len() - 3];
        assert!(PciPlacement::decode(&mut Reader::new("placement", short)).is_err());
    }
}
