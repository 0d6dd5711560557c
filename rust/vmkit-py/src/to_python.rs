//! A serde `Serializer` that builds Python objects directly: structs become
//! instances of the registered Python dataclass of the same name (built
//! without running `__init__`), so a parsed config reaches Python in one pass.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::mem::ManuallyDrop;

use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple, PyType};
use serde::ser::{self, Serialize};

#[derive(Debug)]
pub struct SerError(pub String);

impl fmt::Display for SerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SerError {}

impl ser::Error for SerError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        SerError(msg.to_string())
    }
}

impl From<std::convert::Infallible> for SerError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

impl From<PyErr> for SerError {
    fn from(e: PyErr) -> Self {
        SerError(e.to_string())
    }
}

type Result<T> = std::result::Result<T, SerError>;

/// Hashes a `&'static str`'s address: field names are static, so their
/// addresses identify them.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// What building one struct type's Python object needs, made once per type
/// and thread: creating and hashing field names dominated conversion time.
struct StructInfo {
    /// Field name addresses, to notice a different struct with the same name.
    addresses: Vec<usize>,
    names: Vec<Py<PyString>>,
    /// `{field: None, ...}` for structs without a class: copying it gives a
    /// dict already sized and keyed.
    template: Py<PyDict>,
    class: Option<Py<PyType>>,
}

type StructInfos = HashMap<usize, ManuallyDrop<StructInfo>, BuildHasherDefault<AddressHasher>>;

thread_local! {
    /// Never dropped: the objects may outlive the interpreter at process exit.
    static STRUCTS: RefCell<StructInfos> = RefCell::new(StructInfos::default());
}

/// Struct name → Python class.
#[derive(Clone, Copy)]
pub struct ToPython<'a, 'py> {
    py: Python<'py>,
    classes: &'a Bound<'py, PyDict>,
}

impl<'a, 'py> ToPython<'a, 'py> {
    pub fn new(py: Python<'py>, classes: &'a Bound<'py, PyDict>) -> Self {
        ToPython { py, classes }
    }

    pub fn convert<T: Serialize + ?Sized>(self, value: &T) -> Result<Bound<'py, PyAny>> {
        value.serialize(self)
    }

    fn struct_info(&self, name: &'static str, fields: &[&'static str]) -> Result<StructInfo> {
        let py = self.py;
        let names: Vec<Py<PyString>> = fields
            .iter()
            .map(|f| PyString::intern(py, f).unbind())
            .collect();
        let template = PyDict::new(py);
        for field in &names {
            template.set_item(field.bind(py), py.None())?;
        }
        let class = match self.classes.get_item(name)? {
            Some(class) => Some(class.cast_into::<PyType>().map_err(PyErr::from)?.unbind()),
            None => None,
        };
        Ok(StructInfo {
            addresses: fields.iter().map(|f| f.as_ptr() as usize).collect(),
            names,
            template: template.unbind(),
            class,
        })
    }

    /// An instance of the class registered as `name` (or a plain dict).
    fn instance(
        &self,
        name: &'static str,
        fields: &[&'static str],
        values: Vec<Bound<'py, PyAny>>,
    ) -> Result<Bound<'py, PyAny>> {
        let py = self.py;
        STRUCTS.with(|cache| -> Result<_> {
            let mut cache = cache.borrow_mut();
            let key = name.as_ptr() as usize;
            let stale = cache.get(&key).is_none_or(|info| {
                info.addresses.len() != fields.len()
                    || info
                        .addresses
                        .iter()
                        .zip(fields)
                        .any(|(address, f)| *address != f.as_ptr() as usize)
            });
            if stale {
                cache.insert(key, ManuallyDrop::new(self.struct_info(name, fields)?));
            }
            let info = &cache[&key];
            // Building the object cannot run Python code that converts again,
            // so the cache stays borrowed meanwhile.
            if let Some(class) = &info.class {
                return Ok(new_instance(class.bind(py), &info.names, values)?);
            }
            let dict = info.template.bind(py).copy()?;
            for (field, value) in info.names.iter().zip(values) {
                dict.set_item(field.bind(py), value)?;
            }
            Ok(dict.into_any())
        })
    }
}

/// `object.__new__(class)` with its fields stored in the instance dict: no
/// `__init__` runs, as the values are already checked and complete.
///
/// The values go into the dict the instance hands out (`PyObject_GenericGetDict`)
/// rather than replacing it: CPython 3.13 keeps attributes in inline values
/// that a replaced dict does not update, so the object would not see them.
fn new_instance<'py>(
    class: &Bound<'py, PyType>,
    names: &[Py<PyString>],
    values: Vec<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = class.py();
    let empty = PyTuple::empty(py);
    // SAFETY: `PyBaseObject_Type` is the static `object` type, from which
    // PyType_GetSlot may read tp_new (allowed for static types since 3.10).
    // The slot is object.__new__, which allocates an instance of any plain
    // Python class; the argument tuple is a valid empty tuple and kwargs may be
    // NULL. The result is a new reference or NULL with an exception set, which
    // `from_owned_ptr_or_err` handles.
    let object = unsafe {
        let object_type = std::ptr::addr_of_mut!(ffi::PyBaseObject_Type);
        let slot = ffi::PyType_GetSlot(object_type, ffi::Py_tp_new);
        if slot.is_null() {
            return Err(PyRuntimeError::new_err("object has no tp_new"));
        }
        let tp_new = std::mem::transmute::<*mut std::ffi::c_void, ffi::newfunc>(slot);
        let raw = tp_new(class.as_type_ptr(), empty.as_ptr(), std::ptr::null_mut());
        Bound::from_owned_ptr_or_err(py, raw)?
    };
    // SAFETY: `object` is a live instance; GenericGetDict returns a new
    // reference to its (possibly just created) `__dict__`, or NULL with an
    // exception set when it has none.
    let dict = unsafe {
        let raw = ffi::PyObject_GenericGetDict(object.as_ptr(), std::ptr::null_mut());
        Bound::from_owned_ptr_or_err(py, raw)?.cast_into::<PyDict>()?
    };
    for (name, value) in names.iter().zip(values) {
        dict.set_item(name.bind(py), value)?;
    }
    Ok(object)
}

pub struct SeqBuilder<'a, 'py> {
    to: ToPython<'a, 'py>,
    items: Vec<Bound<'py, PyAny>>,
}

pub struct StructBuilder<'a, 'py> {
    to: ToPython<'a, 'py>,
    name: &'static str,
    keys: Vec<&'static str>,
    values: Vec<Bound<'py, PyAny>>,
}

pub struct MapBuilder<'a, 'py> {
    to: ToPython<'a, 'py>,
    map: Bound<'py, PyDict>,
    key: Option<Bound<'py, PyAny>>,
}

impl<'a, 'py> ser::Serializer for ToPython<'a, 'py> {
    type Ok = Bound<'py, PyAny>;
    type Error = SerError;
    type SerializeSeq = SeqBuilder<'a, 'py>;
    type SerializeTuple = SeqBuilder<'a, 'py>;
    type SerializeTupleStruct = SeqBuilder<'a, 'py>;
    type SerializeTupleVariant = ser::Impossible<Self::Ok, SerError>;
    type SerializeMap = MapBuilder<'a, 'py>;
    type SerializeStruct = StructBuilder<'a, 'py>;
    type SerializeStructVariant = ser::Impossible<Self::Ok, SerError>;

    fn serialize_bool(self, v: bool) -> Result<Self::Ok> {
        Ok(v.into_pyobject(self.py)?.to_owned().into_any())
    }
    fn serialize_i8(self, v: i8) -> Result<Self::Ok> {
        self.serialize_i64(v.into())
    }
    fn serialize_i16(self, v: i16) -> Result<Self::Ok> {
        self.serialize_i64(v.into())
    }
    fn serialize_i32(self, v: i32) -> Result<Self::Ok> {
        self.serialize_i64(v.into())
    }
    fn serialize_i64(self, v: i64) -> Result<Self::Ok> {
        Ok(v.into_pyobject(self.py)?.into_any())
    }
    fn serialize_u8(self, v: u8) -> Result<Self::Ok> {
        self.serialize_u64(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<Self::Ok> {
        self.serialize_u64(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<Self::Ok> {
        self.serialize_u64(v.into())
    }
    fn serialize_u64(self, v: u64) -> Result<Self::Ok> {
        Ok(v.into_pyobject(self.py)?.into_any())
    }
    fn serialize_f32(self, v: f32) -> Result<Self::Ok> {
        self.serialize_f64(v.into())
    }
    fn serialize_f64(self, v: f64) -> Result<Self::Ok> {
        Ok(v.into_pyobject(self.py)?.into_any())
    }
    fn serialize_char(self, v: char) -> Result<Self::Ok> {
        self.serialize_str(v.encode_utf8(&mut [0u8; 4]))
    }
    fn serialize_str(self, v: &str) -> Result<Self::Ok> {
        Ok(PyString::new(self.py, v).into_any())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Self::Ok> {
        Ok(pyo3::types::PyBytes::new(self.py, v).into_any())
    }
    fn serialize_none(self) -> Result<Self::Ok> {
        Ok(self.py.None().into_bound(self.py))
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Self::Ok> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Self::Ok> {
        self.serialize_none()
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Self::Ok> {
        self.serialize_none()
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Self::Ok> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Self::Ok> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Self::Ok> {
        let dict = PyDict::new(self.py);
        dict.set_item(variant, value.serialize(self)?)?;
        Ok(dict.into_any())
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq> {
        Ok(SeqBuilder {
            to: self,
            items: Vec::with_capacity(len.unwrap_or(0)),
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant> {
        Err(SerError(format!(
            "tuple variants of {name} are not supported"
        )))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap> {
        Ok(MapBuilder {
            to: self,
            map: PyDict::new(self.py),
            key: None,
        })
    }
    fn serialize_struct(self, name: &'static str, len: usize) -> Result<Self::SerializeStruct> {
        Ok(StructBuilder {
            to: self,
            name,
            keys: Vec::with_capacity(len),
            values: Vec::with_capacity(len),
        })
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant> {
        Err(SerError(format!(
            "struct variants of {name} are not supported"
        )))
    }
}

impl<'a, 'py> SeqBuilder<'a, 'py> {
    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.items.push(value.serialize(self.to)?);
        Ok(())
    }
    fn finish(self) -> Result<Bound<'py, PyAny>> {
        Ok(PyList::new(self.to.py, self.items)?.into_any())
    }
}

impl<'a, 'py> ser::SerializeSeq for SeqBuilder<'a, 'py> {
    type Ok = Bound<'py, PyAny>;
    type Error = SerError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.push(value)
    }
    fn end(self) -> Result<Self::Ok> {
        self.finish()
    }
}

impl<'a, 'py> ser::SerializeTuple for SeqBuilder<'a, 'py> {
    type Ok = Bound<'py, PyAny>;
    type Error = SerError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.push(value)
    }
    fn end(self) -> Result<Self::Ok> {
        self.finish()
    }
}

impl<'a, 'py> ser::SerializeTupleStruct for SeqBuilder<'a, 'py> {
    type Ok = Bound<'py, PyAny>;
    type Error = SerError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.push(value)
    }
    fn end(self) -> Result<Self::Ok> {
        self.finish()
    }
}

impl<'a, 'py> ser::SerializeMap for MapBuilder<'a, 'py> {
    type Ok = Bound<'py, PyAny>;
    type Error = SerError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<()> {
        self.key = Some(key.serialize(self.to)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        let key = self
            .key
            .take()
            .ok_or_else(|| SerError("map value without a key".to_owned()))?;
        self.map.set_item(key, value.serialize(self.to)?)?;
        Ok(())
    }
    fn end(self) -> Result<Self::Ok> {
        Ok(self.map.into_any())
    }
}

impl<'a, 'py> ser::SerializeStruct for StructBuilder<'a, 'py> {
    type Ok = Bound<'py, PyAny>;
    type Error = SerError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<()> {
        self.keys.push(key);
        self.values.push(value.serialize(self.to)?);
        Ok(())
    }
    fn end(self) -> Result<Self::Ok> {
        self.to.instance(self.name, &self.keys, self.values)
    }
}
