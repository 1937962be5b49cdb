-- Send each stable study's image series to ainode for analysis; never the SR series (ainode's
-- own reports would otherwise travel back to it).
function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local wanted = {}
  for _, s in ipairs(series) do
    if s['MainDicomTags']['Modality'] ~= 'SR' then
      table.insert(wanted, s['ID'])
    end
  end
  if #wanted > 0 then
    RestApiPost('/modalities/ainode/store', DumpJson({ Resources = wanted }))
  end
end
