//! The site's NBD exports: its primary volumes, by name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Site;
use crate::nbd::{Export, Exports, FileExport};
use crate::store::state::{self, Role};

pub struct SiteExports {
    site: Arc<Site>,
    open: Mutex<HashMap<String, Arc<FileExport>>>,
}

impl SiteExports {
    pub fn new(site: Arc<Site>) -> SiteExports {
        SiteExports {
            site,
            open: Mutex::new(HashMap::new()),
        }
    }
}

impl Exports for SiteExports {
    fn get(&self, name: &str) -> Option<Arc<dyn Export>> {
        let rec = state::get_volume(&*self.site.store, name).ok().flatten()?;
        if rec.role != Role::Primary {
            return None;
        }
        if rec.mode.continuous() {
            // Writes go through the journal; no journal, no export.
            let rt = self.site.start_volume(name);
            return rt.stream.get().map(|s| s.clone() as Arc<dyn Export>);
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = open.get(name) {
            return Some(e.clone() as Arc<dyn Export>);
        }
        let fsync = self
            .site
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .fsync;
        match FileExport::open(&rec.path, fsync) {
            Ok(e) => {
                let e = Arc::new(e);
                open.insert(name.to_string(), e.clone());
                Some(e as Arc<dyn Export>)
            }
            Err(e) => {
                tracing::error!(volume = name, error = %e, "cannot open the volume for NBD");
                None
            }
        }
    }

    fn names(&self) -> Vec<String> {
        state::list_volumes(&*self.site.store)
            .map(|v| {
                v.into_iter()
                    .filter(|v| v.role == Role::Primary)
                    .map(|v| v.name)
                    .collect()
            })
            .unwrap_or_default()
    }
}
