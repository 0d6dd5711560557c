//! A serde `Deserializer` that reads Python objects directly: dicts, lists,
//! tuples, strings, numbers, None, and instances of the registered config
//! classes (read through their `__dict__`). A config object reaches the Rust
//! types and validator in one pass, without JSON text in between; the errors
//! are the ones serde_json gives for the same document, so texts stay as v37's.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::iter::BoundDictIterator;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde::de::{self, DeserializeSeed, IntoDeserializer, Unexpected, Visitor};

#[derive(Debug)]
pub struct DeError(pub String);

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError(msg.to_string())
    }
}

impl From<PyErr> for DeError {
    fn from(e: PyErr) -> Self {
        DeError(e.to_string())
    }
}

type Result<T> = std::result::Result<T, DeError>;

/// One Python value to deserialise; `config_base` is the class whose
/// instances read as structs (their fields are their `__dict__`).
#[derive(Clone, Copy)]
pub struct FromPython<'a, 'py> {
    value: &'a Bound<'py, PyAny>,
    config_base: &'a Bound<'py, PyAny>,
}

impl<'a, 'py> FromPython<'a, 'py> {
    pub fn new(value: &'a Bound<'py, PyAny>, config_base: &'a Bound<'py, PyAny>) -> Self {
        FromPython { value, config_base }
    }

    fn with<'b>(self, value: &'b Bound<'py, PyAny>) -> FromPython<'b, 'py>
    where
        'a: 'b,
    {
        FromPython {
            value,
            config_base: self.config_base,
        }
    }

    /// The fields of a config object, or None for other objects.
    fn config_fields(&self) -> Result<Option<Bound<'py, PyDict>>> {
        if !self.value.is_instance(self.config_base)? {
            return Ok(None);
        }
        let fields = self.value.getattr(intern!(self.value.py(), "__dict__"))?;
        Ok(Some(fields.cast_into::<PyDict>().map_err(PyErr::from)?))
    }

    fn visit_int<'de, V: Visitor<'de>>(&self, visitor: V) -> Result<V::Value> {
        // Non-negative integers are u64 as serde_json reads them.
        if let Ok(v) = self.value.extract::<i64>() {
            return match u64::try_from(v) {
                Ok(u) => visitor.visit_u64(u),
                Err(_) => visitor.visit_i64(v),
            };
        }
        if let Ok(v) = self.value.extract::<u64>() {
            return visitor.visit_u64(v);
        }
        // Beyond 64 bits: name the integer itself (JSON text would read it as a float).
        let text = self.value.str()?.to_string();
        Err(de::Error::invalid_value(
            Unexpected::Other(&format!("integer `{text}`")),
            &visitor,
        ))
    }

    fn not_json(&self) -> DeError {
        let name = self
            .value
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "object".to_owned());
        DeError(format!("{name} is not a JSON value"))
    }
}

/// Typed reads of None fail as serde_json's do ("invalid type: null"); other
/// values go to `deserialize_any`, whose visits give serde_json's texts.
macro_rules! forward_unless_null {
    ($($method:ident)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
                if self.value.is_none() {
                    return Err(de::Error::invalid_type(Unexpected::Other("null"), &visitor));
                }
                self.deserialize_any(visitor)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for FromPython<'_, '_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let value = self.value;
        if let Ok(text) = value.cast::<PyString>() {
            return visitor.visit_str(text.to_str()?);
        }
        if value.is_none() {
            return visitor.visit_unit();
        }
        if let Ok(flag) = value.cast::<PyBool>() {
            return visitor.visit_bool(flag.is_true());
        }
        if value.is_instance_of::<PyInt>() {
            return self.visit_int(visitor);
        }
        if let Ok(number) = value.cast::<PyFloat>() {
            let v = number.value();
            if !v.is_finite() {
                return Err(DeError(format!(
                    "Out of range float values are not JSON compliant: {v}"
                )));
            }
            return visitor.visit_f64(v);
        }
        if let Ok(list) = value.cast::<PyList>() {
            return visitor.visit_seq(SeqAccess {
                from: self,
                items: Items::List(list.clone()),
                index: 0,
            });
        }
        if let Ok(tuple) = value.cast::<PyTuple>() {
            return visitor.visit_seq(SeqAccess {
                from: self,
                items: Items::Tuple(tuple.clone()),
                index: 0,
            });
        }
        if let Ok(dict) = value.cast::<PyDict>() {
            return visitor.visit_map(MapAccess::new(self, dict));
        }
        match self.config_fields()? {
            Some(fields) => visitor.visit_map(MapAccess::new(self, &fields)),
            None => Err(self.not_json()),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        if self.value.is_none() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        if let Ok(dict) = self.value.cast::<PyDict>() {
            return visitor.visit_map(MapAccess::new(self, dict));
        }
        if let Some(fields) = self.config_fields()? {
            if !is_class_of(self.value, name)? {
                let class = self.value.get_type().name()?;
                let what = format!("{class} object");
                return Err(de::Error::invalid_type(Unexpected::Other(&what), &visitor));
            }
            return visitor.visit_map(MapAccess::new(self, &fields));
        }
        // A struct is an object: unlike serde_json, an array is not read as its fields.
        if self.value.is_none()
            || self.value.is_instance_of::<PyList>()
            || self.value.is_instance_of::<PyTuple>()
        {
            return Err(de::Error::invalid_type(unexpected(self.value), &visitor));
        }
        self.deserialize_any(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_struct("", &[], visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        if let Ok(text) = self.value.cast::<PyString>() {
            let variant: de::value::StrDeserializer<'_, DeError> =
                text.to_str()?.into_deserializer();
            return visitor.visit_enum(variant);
        }
        Err(de::Error::invalid_type(unexpected(self.value), &visitor))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_unit()
    }

    forward_unless_null! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char deserialize_str
        deserialize_string deserialize_bytes deserialize_byte_buf deserialize_seq
        deserialize_identifier
    }

    serde::forward_to_deserialize_any! {
        unit unit_struct tuple tuple_struct
    }
}

thread_local! {
    /// Struct name address → address of the class registered for it.
    static CLASSES: RefCell<HashMap<usize, usize>> = RefCell::new(HashMap::new());
}

/// Whether `value` is an instance of the class registered as `name` (a config
/// object of another class is refused, not read field by field).
fn is_class_of(value: &Bound<'_, PyAny>, name: &'static str) -> Result<bool> {
    if name.is_empty() {
        return Ok(true); // a map, not a struct
    }
    // Fast path: the exact class, remembered by address (the registry keeps
    // the classes alive for good).
    let key = name.as_ptr() as usize;
    let exact = value.get_type().as_ptr() as usize;
    if CLASSES.with(|classes| classes.borrow().get(&key) == Some(&exact)) {
        return Ok(true);
    }
    let registered = crate::registry()?.classes.bind(value.py()).get_item(name)?;
    let Some(registered) = registered else {
        return Ok(true); // no class for this struct: any config object will do
    };
    let class = registered.as_ptr() as usize;
    CLASSES.with(|classes| classes.borrow_mut().insert(key, class));
    Ok(exact == class || value.is_instance(&registered)?)
}

/// What a value is, in serde's words for "invalid type" errors.
fn unexpected<'a>(value: &Bound<'_, PyAny>) -> Unexpected<'a> {
    if value.is_none() {
        Unexpected::Other("null")
    } else if value.is_instance_of::<PyBool>() {
        Unexpected::Bool(value.is_truthy().unwrap_or(false))
    } else if value.is_instance_of::<PyInt>() {
        match value.extract::<i64>() {
            Ok(v) if v < 0 => Unexpected::Signed(v),
            Ok(v) => Unexpected::Unsigned(v.unsigned_abs()),
            Err(_) => Unexpected::Other("integer"),
        }
    } else if let Ok(v) = value.extract::<f64>() {
        Unexpected::Float(v)
    } else if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        Unexpected::Seq
    } else {
        Unexpected::Map
    }
}

enum Items<'py> {
    List(Bound<'py, PyList>),
    Tuple(Bound<'py, PyTuple>),
}

struct SeqAccess<'a, 'py> {
    from: FromPython<'a, 'py>,
    items: Items<'py>,
    index: usize,
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>> {
        let item = match &self.items {
            Items::List(list) if self.index < list.len() => list.get_item(self.index)?,
            Items::Tuple(tuple) if self.index < tuple.len() => tuple.get_item(self.index)?,
            _ => return Ok(None),
        };
        self.index += 1;
        seed.deserialize(self.from.with(&item)).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        let len = match &self.items {
            Items::List(list) => list.len(),
            Items::Tuple(tuple) => tuple.len(),
        };
        Some(len.saturating_sub(self.index))
    }
}

struct MapAccess<'a, 'py> {
    from: FromPython<'a, 'py>,
    entries: BoundDictIterator<'py>,
    value: Option<Bound<'py, PyAny>>,
}

impl<'a, 'py> MapAccess<'a, 'py> {
    fn new(from: FromPython<'a, 'py>, dict: &Bound<'py, PyDict>) -> Self {
        MapAccess {
            from,
            entries: dict.iter(),
            value: None,
        }
    }
}

impl<'de> de::MapAccess<'de> for MapAccess<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some(value);
        let Ok(key) = key.cast::<PyString>() else {
            let name = key.get_type().name()?.to_string();
            return Err(DeError(format!("keys must be strings, not {name}")));
        };
        let key: de::value::StrDeserializer<'_, DeError> = key.to_str()?.into_deserializer();
        seed.deserialize(key).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value> {
        let value = self
            .value
            .take()
            .ok_or_else(|| DeError("a map value without its key".to_owned()))?;
        seed.deserialize(self.from.with(&value))
    }
}
