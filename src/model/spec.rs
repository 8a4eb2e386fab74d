//! The model as written, read from TOML, and the problems a model can have.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::domain::Role;

/// At most this many declared roles.
pub const MAX_ROLES: usize = 1024;

/// At most this many permissions.
pub const MAX_PERMISSIONS: usize = 4096;

/// A model as written: declared roles in order, then permissions in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelSpec {
    /// Whether a role the model does not declare is refused by Grant and SetRoles.
    pub strict: bool,
    pub roles: Vec<RoleSpec>,
    pub permissions: Vec<PermissionSpec>,
}

/// A declared role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleSpec {
    pub name: String,
    /// Roles a holder of this one also holds, in the same tenant.
    pub includes: Vec<String>,
    /// Roles a holder of this one in the application tenant holds in every tenant.
    pub in_every_tenant: Vec<String>,
    /// Where it is written (1-based), when read from a file.
    pub line: Option<usize>,
}

/// A permission and the roles that grant it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PermissionSpec {
    pub name: String,
    pub roles: Vec<String>,
    /// Where it is written (1-based), when read from a file.
    pub line: Option<usize>,
}

/// One thing wrong with a model: where, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The place, as a path: `roles.editor.includes`, `permissions."invoice.pay"`.
    pub place: String,
    /// The line of a file it is on, when read from one.
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}, {}: {}", self.place, self.message),
            None => write!(f, "{}: {}", self.place, self.message),
        }
    }
}

impl Problem {
    pub(super) fn at(place: impl Into<String>, line: Option<usize>, message: String) -> Self {
        Self { place: place.into(), line, message }
    }
}

/// The place of role `name`'s `field`.
pub(super) fn role_place(name: &str, field: &str) -> String {
    format!(
        "roles.{}{}",
        quoted(name),
        if field.is_empty() { String::new() } else { format!(".{field}") }
    )
}

/// The place of permission `name`.
pub(super) fn permission_place(name: &str) -> String {
    format!("permissions.{}", quoted(name))
}

/// A TOML key as written: bare when it can be.
fn quoted(key: &str) -> String {
    let bare = !key.is_empty()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if bare { key.to_owned() } else { format!("{key:?}") }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    strict: bool,
    #[serde(default)]
    roles: BTreeMap<String, Spanned<RoleEntry>>,
    #[serde(default)]
    permissions: BTreeMap<String, Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleEntry {
    #[serde(default)]
    includes: Vec<String>,
    #[serde(default)]
    in_every_tenant: Vec<String>,
}

impl ModelSpec {
    /// Reads a model file. A file that is not TOML of this shape is one problem, at its
    /// line; what the model says is checked by [`super::Model::compile`].
    pub fn from_toml(text: &str) -> Result<Self, Vec<Problem>> {
        let file: File = toml::from_str(text).map_err(|err| {
            let line = err.span().map(|span| line_of(text, span.start));
            vec![Problem::at("the file", line, err.message().to_owned())]
        })?;
        let mut roles: Vec<RoleSpec> = file
            .roles
            .into_iter()
            .map(|(name, entry)| {
                let line = Some(line_of(text, entry.span().start));
                let entry = entry.into_inner();
                RoleSpec {
                    name,
                    includes: entry.includes,
                    in_every_tenant: entry.in_every_tenant,
                    line,
                }
            })
            .collect();
        roles.sort_by_key(|role| role.line);
        let mut permissions: Vec<PermissionSpec> = file
            .permissions
            .into_iter()
            .map(|(name, granted)| {
                let line = Some(line_of(text, granted.span().start));
                PermissionSpec { name, roles: granted.into_inner(), line }
            })
            .collect();
        permissions.sort_by_key(|permission| permission.line);
        Ok(Self { strict: file.strict, roles, permissions })
    }

    /// The model as a TOML file that [`from_toml`](Self::from_toml) reads back.
    pub fn to_toml(&self) -> String {
        let list = |names: &[String]| {
            names.iter().map(|name| format!("{name:?}")).collect::<Vec<_>>().join(", ")
        };
        let mut out = String::new();
        if self.strict {
            out.push_str("strict = true\n\n");
        }
        for role in &self.roles {
            out.push_str(&format!("[{}]\n", role_place(&role.name, "")));
            if !role.includes.is_empty() {
                out.push_str(&format!("includes = [{}]\n", list(&role.includes)));
            }
            if !role.in_every_tenant.is_empty() {
                out.push_str(&format!("in_every_tenant = [{}]\n", list(&role.in_every_tenant)));
            }
        }
        if !self.permissions.is_empty() {
            out.push_str("\n[permissions]\n");
            for permission in &self.permissions {
                out.push_str(&format!(
                    "{} = [{}]\n",
                    quoted(&permission.name),
                    list(&permission.roles)
                ));
            }
        }
        out
    }

    /// Every problem with the names alone: invalid, duplicated, over the limits.
    pub(super) fn name_problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.roles.len() > MAX_ROLES {
            problems.push(Problem::at(
                "roles",
                None,
                format!("{} roles declared; at most {MAX_ROLES}", self.roles.len()),
            ));
        }
        if self.permissions.len() > MAX_PERMISSIONS {
            problems.push(Problem::at(
                "permissions",
                None,
                format!("{} permissions; at most {MAX_PERMISSIONS}", self.permissions.len()),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for role in &self.roles {
            if let Err(err) = Role::validate("role", &role.name) {
                problems.push(Problem::at(role_place(&role.name, ""), role.line, err.to_string()));
            }
            if !seen.insert(role.name.as_str()) {
                let message = "declared twice".to_owned();
                problems.push(Problem::at(role_place(&role.name, ""), role.line, message));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for permission in &self.permissions {
            let place = permission_place(&permission.name);
            if let Err(err) = Role::validate("permission", &permission.name) {
                problems.push(Problem::at(place.clone(), permission.line, err.to_string()));
            }
            if !seen.insert(permission.name.as_str()) {
                problems.push(Problem::at(place, permission.line, "declared twice".into()));
            }
        }
        problems
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}
