pub fn bench(_: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("todo")
}
#[derive(clap::Args)]
pub struct BenchArgs {}
