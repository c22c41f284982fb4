use anyhow::Result;

#[derive(clap::Args)]
pub struct DemoArgs {}

pub fn demo(_args: DemoArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
